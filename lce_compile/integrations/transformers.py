"""Hugging Face transformers: ``patch(model)`` makes a causal LM train on the fused cross-entropy.

No model's forward is copied, so a family that computes its loss through ``self.loss_function`` works the day it
ships. While a training call has labels:

1. a forward pre-hook on the model records the call's labels (shifted as ``ForCausalLMLoss`` shifts them);
2. the output layer, inside its own module call (so FSDP/ZeRO hooks around it fire), computes the fused per-token
   sum with its own weight and bias and returns an empty ``(B, 0, V)`` placeholder tied to that sum, so whatever
   the model does to its logits afterwards runs on nothing;
3. ``model.loss_function`` returns ``sum / (num_items_in_batch or kept tokens)``, as transformers divides;
4. a post-hook disarms, also when the forward raises.

What the model does between its head and its loss (Gemma's softcap, Cohere's and Granite's scales) is measured
by a probe at patch time: known values are fed through as the head's output and the logits the loss receives are
fitted by identity, scale or scale + softcap. Anything else is refused.
"""
from __future__ import annotations

import dataclasses
import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..losses import linear_cross_entropy
from ..policy import FusedOptions

__all__ = ["patch", "Patch"]


@dataclasses.dataclass
class _Call:
    """One armed forward: its shifted targets, then the fused sum and count the output layer computed."""
    targets: torch.Tensor
    ignore_index: int
    loss_sum: torch.Tensor | None = None
    count: torch.Tensor | None = None


class Patch:
    """The handle ``patch`` returns; ``remove()`` (or leaving a ``with`` block) restores the model exactly."""

    def __init__(self, model, base, head, logit_scale, softcap, z_loss, options, training_only):
        self.model, self.base, self.head = model, base, head
        self.logit_scale, self.softcap, self.z_loss, self.options = logit_scale, softcap, z_loss, options
        self.training_only = training_only
        self._armed: _Call | None = None
        self._signature = inspect.signature(model.forward)
        self._own_forward = "forward" in head.__dict__, head.__dict__.get("forward")
        self._own_loss = "_loss_function" in base.__dict__, base.__dict__.get("_loss_function")
        self._original_forward = head.forward
        self._original_loss = base.loss_function
        head.forward = self._head_forward
        base.loss_function = self._loss_function
        self._hooks = [model.register_forward_pre_hook(self._arm, with_kwargs=True),
                       model.register_forward_hook(self._disarm, with_kwargs=True, always_call=True)]
        base._lce_compile_patch = self

    def remove(self):
        """Undo everything ``patch`` did; calling it twice is harmless."""
        if self.base.__dict__.get("_lce_compile_patch") is not self:
            return
        for hook in self._hooks:
            hook.remove()
        _restore(self.head, "forward", self._own_forward)
        _restore(self.base, "_loss_function", self._own_loss)
        del self.base._lce_compile_patch

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()

    def __repr__(self):
        return (f"Patch({type(self.base).__name__}, logit_scale={self.logit_scale}, softcap={self.softcap}, "
                f"z_loss={self.z_loss}, training_only={self.training_only})")

    def _arm(self, module, args, kwargs):
        if self.training_only and not module.training:
            return
        bound = self._signature.bind_partial(*args, **kwargs).arguments
        extra = next((value for key, value in bound.items()
                      if self._signature.parameters[key].kind is inspect.Parameter.VAR_KEYWORD), {})
        labels = bound.get("labels", extra.get("labels"))
        if labels is None:
            return
        ignore_index = extra.get("ignore_index", -100)
        targets = extra.get("shift_labels")
        if targets is None:  # ForCausalLMLoss's shift: position t predicts label t + 1, the last one nothing
            targets = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        self._armed = _Call(targets, ignore_index)

    def _disarm(self, module, args, kwargs, output):
        self._armed = None

    def _head_forward(self, hidden):
        call = self._armed
        if call is None:
            return self._original_forward(hidden)
        if hidden.shape[:-1] != call.targets.shape:
            raise ValueError(f"lce_compile.integrations.transformers: the output layer got hidden states of shape "
                             f"{tuple(hidden.shape)} for labels of shape {tuple(call.targets.shape)}; train with "
                             f"logits_to_keep=0 (the default).")
        targets = call.targets.to(hidden.device)
        head = self.head
        call.loss_sum = linear_cross_entropy(
            hidden, head.weight, targets, bias=head.bias, ignore_index=call.ignore_index,
            logit_scale=self.logit_scale, softcap=self.softcap, z_loss=self.z_loss, reduction="sum",
            options=self.options)
        call.count = (targets != call.ignore_index).sum()
        # zero-size but not a view, and on the loss's backward path: FSDP's pre-backward hooks hang on it
        empty = hidden.new_zeros(*hidden.shape[:-2], 0, head.out_features, dtype=head.weight.dtype)
        return empty + 0 * call.loss_sum

    def _loss_function(self, *args, **kwargs):
        call = self._armed
        if call is None or call.loss_sum is None:
            return self._original_loss(*args, **kwargs)
        logits = kwargs["logits"] if "logits" in kwargs else args[0]
        total = kwargs.get("num_items_in_batch")
        total = call.count if total is None else total.to(call.loss_sum.device) if torch.is_tensor(total) else total
        loss, call.loss_sum = call.loss_sum / total, None  # consumed: a second call in one forward is not ours
        return loss + logits.float().sum()  # + 0, keeping the placeholder on the backward path


def patch(model: nn.Module, *, z_loss: float = 0.0, options: FusedOptions | None = None,
          training_only: bool = True) -> Patch:
    """Train ``model`` (a transformers causal LM, or a PEFT model around one) on the fused cross-entropy.

    While patched, ``model(input_ids, labels=labels)`` in training mode returns the same ``loss`` as unpatched
    (up to float rounding) and the same gradients for every parameter, without a ``(tokens x vocab)`` tensor;
    ``outputs.logits`` is then an empty ``(B, 0, V)`` tensor. In eval mode (unless ``training_only=False``) or
    without labels the model runs exactly as unpatched: full logits, ``generate`` untouched. Patch the module you
    call (the PEFT model, not the base model inside it).

    Args:
        model: a ``PreTrainedModel`` whose forward computes its loss with ``self.loss_function``.
        z_loss (float): adds PaLM's ``z_loss * logsumexp(logits) ** 2`` per kept token (a change of loss,
            made only when asked). Default: ``0.0``.
        options (FusedOptions, optional): engine knobs.
        training_only (bool): fuse only in training mode. Default: ``True``.
    Returns:
        a :class:`Patch`; ``handle.remove()`` restores the model.
    Raises:
        ValueError: the model computes its loss without ``self.loss_function``, its output layer is not a plain
            ``nn.Linear`` called as a module (a LoRA-wrapped head included), or the map from head output to the
            logits its loss receives is not identity, scale or softcap. Nothing is patched then.
    """
    name = type(model).__name__
    if not z_loss >= 0:
        raise ValueError(f"patch({name}): z_loss must be >= 0, got {z_loss!r}.")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not hasattr(base, "loss_function") or not hasattr(base, "get_output_embeddings"):
        raise ValueError(f"patch({name}): expected a transformers PreTrainedModel (or a PEFT model around one).")
    if "_lce_compile_patch" in base.__dict__:
        raise ValueError(f"patch({name}): the model is already patched; remove() that patch first.")
    from transformers.loss.loss_utils import ForCausalLMLoss
    if base.loss_function is not ForCausalLMLoss:  # another loss_type, or a loss_function set by the user
        raise ValueError(f"patch({name}): its loss_function is {getattr(base.loss_function, '__qualname__', '?')}, "
                         f"not transformers' ForCausalLMLoss, so the fused cross-entropy would compute another loss.")
    head = base.get_output_embeddings()
    if type(head) is not nn.Linear and not (isinstance(head, nn.Linear) and type(head).forward is nn.Linear.forward):
        raise ValueError(f"patch({name}): its output layer is a {type(head).__name__}, not a plain nn.Linear, so "
                         f"its output cannot be computed from its weight alone (a LoRA-wrapped or replaced head?).")
    if head.weight.is_meta:
        raise ValueError(f"patch({name}): its output layer's weight is on the meta device; load it first.")
    logit_scale, softcap = _probe(model, base, head)
    return Patch(model, base, head, logit_scale, softcap, z_loss, options, training_only)


def _restore(module, attribute, saved):
    had, value = saved
    if had:
        setattr(module, attribute, value)
    else:
        module.__dict__.pop(attribute, None)


def _probe(model, base, head):
    """Run the model once on 2 tokens with known values as the head's output; fit what its loss receives."""
    name = type(model).__name__
    seen = {}

    def known_head_output(module, args, output):
        seen["z"] = _probe_values(output.shape, output.device)
        return seen["z"]

    def record_loss(*args, **kwargs):
        seen["y"] = kwargs["logits"] if "logits" in kwargs else args[0]
        return seen["y"].float().sum() * 0

    modes = {m: m.training for m in model.modules()}
    own_loss = "_loss_function" in base.__dict__, base.__dict__.get("_loss_function")
    hook = head.register_forward_hook(known_head_output)
    base.loss_function = record_loss
    try:
        model.eval()
        ids = torch.tensor([[0, 1]], device=head.weight.device)
        with torch.no_grad():
            model(input_ids=ids, labels=ids)
    finally:
        hook.remove()
        _restore(base, "_loss_function", own_loss)
        for module, training in modes.items():
            module.training = training
    if "z" not in seen:
        raise ValueError(f"patch({name}): its forward does not call its output layer as a module "
                         f"({type(head).__name__} from get_output_embeddings()), so the fused loss cannot enter it.")
    if "y" not in seen:
        raise ValueError(f"patch({name}): its forward computes the loss without self.loss_function, so the fused "
                         f"loss cannot enter it; use the losses of lce_compile directly.")
    fit = _fit_transform(seen["z"].double(), seen["y"].double())
    if fit is None:
        raise ValueError(f"patch({name}): the logits its loss receives are not its output layer's output under an "
                         f"identity, a scale or a softcap, so a fused loss would compute another loss.")
    return fit


def _probe_values(shape, device):
    """fp32 values spanning 1e-2 ... 60 in both signs, plus +-1e4 to saturate a softcap, in every row."""
    vocab = shape[-1]
    magnitudes = torch.logspace(-2, math.log10(60.0), max((vocab - 2) // 2, 1), dtype=torch.float64)
    row = torch.cat([torch.tensor([1e4, -1e4], dtype=torch.float64), magnitudes, -magnitudes])
    row = torch.cat([row, torch.zeros(max(vocab - row.numel(), 0), dtype=torch.float64)])[:vocab]
    return row.to(device=device, dtype=torch.float32).expand(shape).contiguous()


def _fit_transform(z, y, rtol=1e-4):
    """(logit_scale, softcap) with y = softcap * tanh(logit_scale * z / softcap) (no softcap: y = scale * z)."""
    if y.shape != z.shape or not torch.isfinite(y).all():
        return None
    scale = float((y * z).sum() / (z * z).sum())
    if torch.allclose(y, scale * z, rtol=rtol, atol=rtol):
        return (1.0 if abs(scale - 1.0) < 1e-6 else scale), None
    cap = float(y.abs().max())  # the +-1e4 entries saturate tanh
    inner = (y.abs() < 0.5 * cap) & (z != 0)  # where atanh is well conditioned
    if cap <= 0 or not inner.any():
        return None
    scale = float((cap * torch.atanh(y[inner] / cap) / z[inner]).median())
    if torch.allclose(y, cap * torch.tanh(scale * z / cap), rtol=rtol, atol=rtol * cap):
        return (1.0 if abs(scale - 1.0) < 1e-6 else scale), cap
    return None
