"""torchtitan: ``--override.imports lce_compile.integrations.torchtitan.lce_loss`` trains on the fused cross-entropy.

torchtitan (0.3.0) builds its loss from ``Trainer.Config.loss``. For a ``ChunkedLossWrapper`` (every registry LLM
config) the trainer calls ``set_lm_head(model.lm_head)`` and sets ``model._skip_lm_head``, so the model returns its
final-norm hidden states and the loss receives the output layer. :class:`FusedCrossEntropyLoss` is such a wrapper:
it computes ``linear_cross_entropy(hidden, head.weight, labels, reduction="sum") / global_valid_tokens``, dividing
by torchtitan's own on-device token count (over micro-batches and data-parallel ranks), as its CE does.

- FSDP2: the head is ``unshard()``-ed once per step, before its weight is read, as torchtitan's chunked loss does;
  FSDP's own post-backward hook reduce-scatters its gradient and reshards it, and ``set_requires_gradient_sync``
  (deferred sync under gradient accumulation) is left to the caller.
- Tensor parallel (DTensor, ``Shard(0)`` head): the vocabulary-parallel loss of ``lce_compile.parallel``.
- CUDA graphs capture the step by default: no value is read back to the host; target validation is skipped while a
  stream is capturing.
- What it cannot do exactly falls back to the stock loss (``ChunkedLossWrapper`` with torchtitan's CE) with a
  one-time warning, or raises ``NotImplementedError`` with ``strict=True``: tensor parallelism other than DTensor
  TP on a 1-D mesh (see :func:`_tensor_parallel`), extra loss inputs (RL losses), a multi-token
  prediction output, a head whose class's ``forward`` is not ``nn.Linear.forward``. Configs whose loss is not a
  ``ChunkedLossWrapper`` of ``CrossEntropyLoss`` (MTP, MSE, RL losses) are left unchanged by :func:`lce_loss`.
"""
from __future__ import annotations

import dataclasses
import warnings

import spmd_types as spmd
import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torchtitan.components.loss import IGNORE_INDEX, BaseLoss, ChunkedLossWrapper, CrossEntropyLoss
from torchtitan.config import CompileConfig, override

from .. import checks
from ..losses import LinearCrossEntropyLoss, linear_cross_entropy
from ..policy import FusedOptions

__all__ = ["FusedCrossEntropyLoss", "lce_loss"]

_NAME = "lce_compile.integrations.torchtitan"
_warned: set[str] = set()


class FusedCrossEntropyLoss(ChunkedLossWrapper):
    """torchtitan's cross-entropy, fused with the output layer: never holds the ``(tokens, V)`` logits.

    Same value and gradients, up to float rounding, as torchtitan's ``ChunkedLossWrapper`` over its
    ``CrossEntropyLoss``::

        logits = model.lm_head(hidden).float()                               # (B, L, V)
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(0, 1), ignore_index=-100,
                               label_smoothing=label_smoothing, reduction="sum")
        loss = loss + z_loss * (logits.logsumexp(-1) ** 2 * (labels != -100)).sum()
        loss = loss / global_valid_tokens                                    # when given

    Config (besides ``ChunkedLossWrapper``'s ``num_chunks`` and ``loss_fn``, used by the fallback only):
        chunk_memory (float, optional): :class:`lce_compile.FusedOptions`' memory knob.
        z_loss (float): PaLM's ``z_loss * logsumexp(logits) ** 2`` per kept token. Default: ``0.0``.
        label_smoothing (float): as in ``F.cross_entropy``. Default: ``0.0``.
        strict (bool): raise ``NotImplementedError`` instead of falling back to the stock loss. Default: ``False``.
    Memory: the head's gradients plus one ``(C, V)`` chunk.

    .. note::
        A fallback with ``z_loss`` or ``label_smoothing`` set raises ``NotImplementedError``: the stock loss has
        neither, so it would train a different objective.
    """

    @dataclasses.dataclass(kw_only=True, slots=True)
    class Config(ChunkedLossWrapper.Config):
        chunk_memory: float | None = None
        z_loss: float = 0.0
        label_smoothing: float = 0.0
        strict: bool = False

    def __init__(self, config: Config, *, compile_config: CompileConfig | None = None):
        super().__init__(config, compile_config=compile_config)
        LinearCrossEntropyLoss(z_loss=config.z_loss, label_smoothing=config.label_smoothing)  # validates both
        self.z_loss, self.label_smoothing, self.strict = config.z_loss, config.label_smoothing, config.strict
        self.options = FusedOptions(chunk_memory=config.chunk_memory)
        # while a CUDA graph captures, checking target values (one read-back) is not allowed
        self.capture_options = dataclasses.replace(self.options, validate=False)
        self.global_vocab_size = getattr(self.loss_fn, "global_vocab_size", None)

    def __call__(self, pred, labels, global_valid_tokens=None, **loss_inputs):
        """``(loss, metrics)`` as torchtitan's losses: the summed loss over ``global_valid_tokens``, ``{}``."""
        head = self.lm_head
        if head is None:
            raise RuntimeError(f"{_NAME}: the trainer did not call set_lm_head(model.lm_head) before the loss.")
        reason = _unsupported(pred, head, loss_inputs)
        fsdp = reason is None and _is_fsdp(head)
        if fsdp:
            head.unshard()  # once per call, while FSDP is idle; its post-backward hook reshards
        reason = reason or _tensor_parallel(pred, head.weight, self.global_vocab_size)
        if reason is not None:
            return self._fallback(reason, pred, labels, global_valid_tokens, **loss_inputs)
        checking = spmd.is_type_checking()  # torchtitan's SPMD type checker: off by default
        with spmd.no_typecheck():
            loss = linear_cross_entropy(
                pred, head.weight, labels, bias=head.bias, ignore_index=IGNORE_INDEX,
                label_smoothing=self.label_smoothing, z_loss=self.z_loss, reduction="sum",
                options=self.capture_options if checks.stream_capturing() else self.options)
            if isinstance(loss, DTensor):  # tensor parallel: the same sum on every rank
                loss = loss.to_local()
            if global_valid_tokens is not None:
                loss = loss / global_valid_tokens
        if checking and global_valid_tokens is not None:
            spmd.assert_type(loss, {"dp": spmd.P, "cp": spmd.P, "tp": spmd.I})  # as torchtitan's CE asserts
        if fsdp and not loss.requires_grad:
            head.reshard()  # validation: no backward will reshard it
        return loss, {}

    def _fallback(self, reason, pred, labels, global_valid_tokens, **loss_inputs):
        if self.strict:
            raise NotImplementedError(f"{_NAME}: {reason}; strict=True forbids the stock-loss fallback.")
        if self.z_loss or self.label_smoothing:
            raise NotImplementedError(f"{_NAME}: {reason}, and the stock loss it would fall back to has no z_loss "
                                      f"or label_smoothing. Set both to 0 for this run.")
        _warn_once(reason, f"{_NAME}: {reason}; using torchtitan's own chunked cross-entropy instead.")
        return super().__call__(pred, labels, global_valid_tokens, **loss_inputs)


@override(target=BaseLoss.Config, fqns=["loss"], description="lce_compile fused linear cross-entropy")
def lce_loss(config: BaseLoss.Config, *, chunk_memory: float | None = None, z_loss: float = 0.0,
             label_smoothing: float = 0.0, strict: bool = False) -> BaseLoss.Config:
    """The override: ``--override.imports lce_compile.integrations.torchtitan.lce_loss[={json kwargs}]``.

    Replaces a ``ChunkedLossWrapper.Config`` of ``CrossEntropyLoss.Config`` (the registry LLM configs) by a
    :class:`FusedCrossEntropyLoss.Config` with the same fields and the given kwargs (see its Config). Any other
    loss (MTP, MSE, RL losses, an unchunked ``CrossEntropyLoss`` whose model returns logits) is kept, with a
    one-time warning, or raises ``NotImplementedError`` with ``strict=True``.
    """
    FusedOptions(chunk_memory=chunk_memory)  # validates the knobs before anything is built
    LinearCrossEntropyLoss(z_loss=z_loss, label_smoothing=label_smoothing)
    if type(config) in (ChunkedLossWrapper.Config, FusedCrossEntropyLoss.Config) and \
            type(config.loss_fn) is CrossEntropyLoss.Config:
        return FusedCrossEntropyLoss.Config(num_chunks=config.num_chunks, loss_fn=config.loss_fn,
                                            chunk_memory=chunk_memory, z_loss=z_loss,
                                            label_smoothing=label_smoothing, strict=strict)
    inner = getattr(config, "loss_fn", None)
    name = type(config).__qualname__ + ("" if inner is None else f"({type(inner).__qualname__})")
    reason = f"the config's loss is {name}, not ChunkedLossWrapper.Config(loss_fn=CrossEntropyLoss.Config)"
    if strict:
        raise NotImplementedError(f"{_NAME}.lce_loss: {reason}; strict=True forbids keeping it.")
    _warn_once(reason, f"{_NAME}.lce_loss: {reason}; it is kept unchanged.")
    return config


def _unsupported(pred, head, loss_inputs) -> str | None:
    """Why this call cannot be computed exactly from the head's weight (a reason to fall back), or None."""
    if not isinstance(pred, torch.Tensor):
        return f"the model returned a {type(pred).__name__} (multi-token prediction?), not one hidden-state tensor"
    extra = sorted(set(loss_inputs) - {"positions"})  # the trainer passes positions; the CE ignores them
    if extra:
        return f"loss inputs {extra} (an RL loss?) are not part of the cross-entropy"
    # FSDP2 renames the class (FSDPLinear) and TP replaces the instance's forward, so look at the class's forward
    if type(head).forward is not nn.Linear.forward:
        return f"the head's class {type(head).__qualname__} has its own forward, not nn.Linear's"
    return None


def _tensor_parallel(pred, weight, global_vocab_size) -> str | None:
    """Why this call cannot take the vocabulary-parallel path, or None. Called after FSDP's unshard, so a DTensor
    weight here is a tensor-parallel shard: with DTensor hidden states on its mesh (torchtitan's DTensor TP, the
    final norm's output ``Shard(1)`` under sequence parallelism) ``linear_cross_entropy`` computes the
    vocabulary-parallel loss exactly (docs/distributed.md)."""
    if isinstance(weight, DTensor):
        from torch.distributed.tensor import Shard
        if not (isinstance(pred, DTensor) and pred.device_mesh == weight.device_mesh
                and weight.device_mesh.ndim == 1 and tuple(weight.placements) == (Shard(0),)):
            return (f"a tensor-parallel head ({tuple(weight.placements)}) beside hidden states that are not a "
                    f"DTensor on its 1-D mesh")
        return None
    if isinstance(pred, DTensor):
        return "DTensor hidden states beside a plain head"
    from torchtitan.distributed.spmd_types import spmd_mesh_size
    from torchtitan.distributed.utils import get_spmd_backend

    if get_spmd_backend() == "spmd_types" and spmd_mesh_size("tp") > 1:
        return "tensor parallelism on plain local tensors (the spmd_types backend) is not supported yet"
    if global_vocab_size is not None and weight.shape[0] != global_vocab_size:
        return f"the head holds {weight.shape[0]} of {global_vocab_size} vocabulary rows (a TP shard?)"
    return None


def _is_fsdp(head) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(head, FSDPModule)


def _warn_once(key: str, message: str) -> None:
    if key not in _warned and not torch.compiler.is_compiling():
        _warned.add(key)
        warnings.warn(message, stacklevel=3)
