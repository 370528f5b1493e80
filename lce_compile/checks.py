"""Input validation and the engine's errors. The checks shared by the losses and their messages live here;
options that only one loss has are checked beside it, with the same template.

Template: ``<function>: <argument> <expected>, got <actual>.[ <one-line fix>]``. Shape and device checks
cost nothing on the device; value checks (target range) read one scalar back, so they run once before the
chunk loop and are skipped inside ``torch.compile`` and while the current CUDA stream captures a CUDA graph
(where a read-back is illegal): ``FusedOptions(validate=True)`` then checks no values, and without the kept rows'
count the front door computes every row instead of gathering the kept ones.
"""
from __future__ import annotations

import inspect

import torch

from . import policy

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
REDUCTIONS = ("mean", "sum", "none")


def _shape(t: torch.Tensor) -> tuple:
    return tuple(t.shape)


def check_head(name: str, hidden, weight, bias=None, prefix: str = "") -> None:
    """hidden (..., D), weight (V, D), bias (V,) or None: types, shapes, dtypes, devices.

    ``prefix`` names the head in messages, e.g. ``"teacher_"`` for teacher_hidden / teacher_weight.
    """
    h, w, b = f"{prefix}hidden", f"{prefix}weight", f"{prefix}bias"
    for arg, value in ((h, hidden), (w, weight)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name}: {arg} must be a Tensor, got {type(value).__name__}.")
        if value.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name}: {arg} must be float32, bfloat16, float16 or float64, got {value.dtype}.")
    if hidden.dim() < 1:
        raise ValueError(f"{name}: {h} must have shape (..., D), got a 0-d tensor.")
    if weight.dim() != 2:
        raise ValueError(f"{name}: {w} must have shape (V, D), got {_shape(weight)}.")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{name}: {h}'s last dimension must equal {w}'s D = {weight.shape[1]} "
            f"({w} is (V, D) = {_shape(weight)}), got {h} {_shape(hidden)}."
        )
    autocast = policy.autocast_dtype(hidden.device) is not None  # casts both to one dtype
    if hidden.dtype != weight.dtype and not autocast:
        raise TypeError(f"{name}: {h} and {w} must have one dtype, got {hidden.dtype} and {weight.dtype}. "
                        f"Cast one, or run the loss under torch.autocast.")
    check_device(name, w, weight, hidden)
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"{name}: {b} must be a Tensor or None, got {type(bias).__name__}.")
        if _shape(bias) != (weight.shape[0],):
            raise ValueError(f"{name}: {b} must have shape (V,) = ({weight.shape[0]},), got {_shape(bias)}.")
        if bias.dtype != weight.dtype and not autocast:
            raise TypeError(f"{name}: {b} must have {w}'s dtype {weight.dtype}, got {bias.dtype}.")
        check_device(name, b, bias, hidden)


def check_teacher(name: str, hidden, weight, teacher_hidden, teacher_weight) -> None:
    """A frozen second head: the student's tokens (leading shape), vocabulary and device."""
    if teacher_hidden.shape[:-1] != hidden.shape[:-1]:
        raise ValueError(
            f"{name}: teacher_hidden must have hidden's leading shape {_shape(hidden)[:-1]} "
            f"(one teacher row per token), got {_shape(teacher_hidden)}.")
    if teacher_weight.shape[0] != weight.shape[0]:
        raise ValueError(
            f"{name}: teacher_weight must have the student's vocabulary V = {weight.shape[0]}, "
            f"got {_shape(teacher_weight)}.")
    check_device(name, "teacher_hidden", teacher_hidden, hidden)


def check_device(name: str, arg: str, tensor: torch.Tensor, hidden: torch.Tensor) -> None:
    if tensor.device != hidden.device:
        raise ValueError(f"{name}: {arg} must be on hidden's device {hidden.device}, got {tensor.device}.")


def check_rows(name: str, arg: str, tensor, hidden: torch.Tensor) -> None:
    """A per-row input: a tensor whose leading shape is hidden's leading shape."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name}: {arg} must be a Tensor, got {type(tensor).__name__}.")
    lead = _shape(hidden)[:-1]
    if _shape(tensor)[: len(lead)] != lead:
        raise ValueError(
            f"{name}: {arg} must have the leading shape of hidden {lead}, got {_shape(tensor)}."
        )
    check_device(name, arg, tensor, hidden)


def check_targets(name: str, targets, hidden, vocab: int, ignore_index: int | None, validate: bool,
                  arg: str = "targets", kept=None) -> int | None:
    """Class-index targets: hidden's leading shape exactly, an integer dtype, values in [0, V) or ignore_index
    (``None``: no value is ignored). Any integer dtype is read as int64 class indices (callers convert with
    ``.long()`` before comparing with ``ignore_index``).

    Returns the count of kept targets (or of the True rows of ``kept``, a mask with targets' shape), read back with
    the range (one read-back for both), or None when the values are not checked: ``validate=False``, inside
    ``torch.compile``, or while the current CUDA stream captures a graph (targets on CUDA: :func:`stream_capturing`;
    out-of-range targets then give NaN, as with ``validate=False``)."""
    check_rows(name, arg, targets, hidden)
    if targets.dim() != hidden.dim() - 1:
        raise ValueError(
            f"{name}: {arg} must have the leading shape of hidden {_shape(hidden)[:-1]}, got {_shape(targets)}."
        )
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(
            f"{name}: {arg} must be an integer tensor of class indices, got {targets.dtype}. "
            "Probability targets need the full (N, V) tensor and are not supported."
        )
    if (not validate or targets.numel() == 0 or torch.compiler.is_compiling() or targets.device.type == "meta"
            or stream_capturing(targets.device)):
        return None
    targets = targets.long()  # compared as int64: in uint8, ignore_index=-100 would wrap to 156
    if kept is None:
        kept = None if ignore_index is None else targets != ignore_index
    count = targets.numel() if kept is None else kept.to(torch.bool).sum()
    checked = targets if ignore_index is None else torch.where(targets != ignore_index, targets, 0)
    *bounds, count = torch.stack([checked.amin(), checked.amax(),
                                  torch.as_tensor(count, device=checked.device)]).tolist()
    if bounds[0] < 0 or bounds[1] >= vocab:
        bad = bounds[0] if bounds[0] < 0 else bounds[1]
        allowed = "" if ignore_index is None else f" or ignore_index={ignore_index}"
        raise ValueError(f"{name}: {arg} must be in [0, {vocab}){allowed}, got {bad}.")
    return count


def stream_capturing(device=None) -> bool:
    """Whether the current CUDA stream captures a CUDA graph, so that reading a value back would be illegal.

    ``device``: the tensors' device (only a CUDA device captures); ``None``: CUDA, if this machine has it."""
    if device is None:
        return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
    return torch.device(device).type == "cuda" and torch.cuda.is_current_stream_capturing()


def check_class_weight(name: str, arg: str, class_weight, hidden, vocab: int) -> None:
    if class_weight is None:
        return
    if not isinstance(class_weight, torch.Tensor):
        raise TypeError(f"{name}: {arg} must be a Tensor or None, got {type(class_weight).__name__}.")
    if _shape(class_weight) != (vocab,):
        raise ValueError(f"{name}: {arg} must have shape (V,) = ({vocab},), got {_shape(class_weight)}.")
    if not class_weight.dtype.is_floating_point:
        raise TypeError(f"{name}: {arg} must be a float tensor, got {class_weight.dtype}.")
    if class_weight.requires_grad:
        raise NotImplementedError(f"{name}: {arg} requires grad; only hidden, weight and bias get gradients.")
    check_device(name, arg, class_weight, hidden)


def check_reduction(name: str, reduction) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"{name}: reduction must be one of 'mean', 'sum', 'none', got {reduction!r}.")


@torch.compiler.assume_constant_result  # inside torch.compile: evaluated once while tracing, a constant
def parameters(fn) -> tuple | None:
    """fn's parameters as ((name, kind), ...) with inspect's kinds as ints, or None without a signature."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    return tuple((p.name, int(p.kind)) for p in params)


_POSITIONAL = (int(inspect.Parameter.POSITIONAL_ONLY), int(inspect.Parameter.POSITIONAL_OR_KEYWORD))
_NOT_KEYWORD = (int(inspect.Parameter.POSITIONAL_ONLY), int(inspect.Parameter.VAR_POSITIONAL))


def positional_names(fn) -> tuple:
    """Names of fn's positional parameters (logits first), () without a signature."""
    return tuple(n for n, kind in parameters(fn) or () if kind in _POSITIONAL)


def check_keywords(name: str, fn, n_rows: int, kwargs: dict) -> None:
    """The call's keywords must be parameters of ``fn`` (unless it takes ``**kwargs``)."""
    params = parameters(fn)
    if params is None or any(kind == int(inspect.Parameter.VAR_KEYWORD) for _, kind in params):
        return  # no signature, or **kwargs: let fn itself judge
    taken = positional_names(fn)[: 1 + n_rows]  # logits, then the row inputs
    accepted = [n for n, kind in params if n not in taken and kind not in _NOT_KEYWORD]
    for key in kwargs:
        if key not in accepted:
            raise TypeError(
                f"{name}: unknown keyword {key!r}; {getattr(fn, '__name__', 'fn')} accepts "
                f"{', '.join(accepted) or 'no keywords'} (plus bias= and options= for the fused call)."
            )


def check_no_grad(name: str, arg: str, tensor) -> None:
    if isinstance(tensor, torch.Tensor) and tensor.requires_grad and torch.is_grad_enabled():
        raise NotImplementedError(
            f"{name}: {arg} requires grad; only hidden, weight and bias get gradients. Pass {arg}.detach()."
        )


def scalar_output_error(name: str, fn_name: str) -> ValueError:
    return ValueError(
        f"{name}: {fn_name} returned a scalar, which cannot be split over chunks exactly. "
        "Return one value per row, or declare how it reduces: fused_loss(fn, returns='sum') or "
        "fused_loss(fn, returns='mean', mean_over=...)."
    )


def rows_output_error(name: str, fn_name: str, rows: int, shape: tuple) -> ValueError:
    return ValueError(
        f"{name}: {fn_name} must return one value per row, shape ({rows},), got {shape}."
    )


def declared_scalar_error(name: str, fn_name: str, returns: str, shape: tuple) -> ValueError:
    return ValueError(
        f"{name}: {fn_name} was declared returns={returns!r}, so it must return a scalar, got shape {shape}."
    )


def double_backward_error(name: str) -> NotImplementedError:
    return NotImplementedError(
        f"{name}: double backward (backward with create_graph=True, e.g. a gradient penalty or gradgradcheck) is "
        "not supported: the fused loss's gradients are computed chunk by chunk and are not differentiable. "
        "Compute that term with the unfused loss."
    )


def function_transform_error(name: str) -> NotImplementedError:
    return NotImplementedError(
        f"{name}: torch.func transforms (grad, vjp, vmap, jacrev, ...) over a fused loss are not supported. "
        "Use torch.autograd (loss.backward() or torch.autograd.grad) instead."
    )
