"""TRL: ``install()`` routes every TRL trainer's log-probs through the fused engine.

TRL's trainers (SFT, DPO, KTO, GRPO, RLOO; policy and reference model) get their per-token log-probs from
``add_fused_lm_head``, which looks up ``trl.trainer.utils._ChunkedLogProbFunction`` at call time and calls its
``apply(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping, logit_scale, outputs)``
for ``(log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1)``. Swapping that one module global reaches
every trainer; their loss math stays TRL's own.
"""
from __future__ import annotations

import contextlib
import importlib
import inspect

import torch

from ..losses import AuxRequest, linear_token_logprobs
from ..policy import FusedOptions

__all__ = ["install", "uninstall", "use", "FusedLogProbFunction"]

_MODULE, _NAME = "trl.trainer.utils", "_ChunkedLogProbFunction"
# apply's arguments after ctx, as TRL 1.16 defines them; another signature is refused at install()
_SIGNATURE = ("hidden", "weight", "bias", "targets", "temperature", "chunk_size", "final_logit_softcapping",
              "logit_scale", "outputs")
_OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
_state = {"original": None, "options": None}
# TRL's kernel keeps fp32 gradient accumulators ("bf16 rounding per chunk makes the entropy drift"); so does the
# swap unless told otherwise. On CUDA this costs an fp32 (V, D) buffer, twice a bf16 weight gradient.
TRL_OPTIONS = FusedOptions(grad_weight_dtype=torch.float32)


class FusedLogProbFunction:
    """Stands in for TRL's chunked log-prob function: the same ``apply`` arguments, the same five outputs
    (unrequested ones ``None``; ``log_probs`` and ``entropy`` differentiable, the others detached)."""

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
              logit_scale=1.0, outputs=_OUTPUTS):
        # chunk_size is TRL's vocabulary tile; the engine chooses its own chunks (FusedOptions)
        if getattr(weight, "ds_id", None) is not None and torch.is_grad_enabled() and weight.requires_grad:
            # ZeRO-3 gathers the head around this call only; our backward recomputes chunks after the gather ends
            raise NotImplementedError("lce_compile.integrations.trl: a DeepSpeed ZeRO-3 partitioned head that "
                                      "trains is not supported; uninstall() for it, or use ZeRO-2 / FSDP2.")
        request = AuxRequest(**{name: True for name in outputs if name in _OUTPUTS})
        log_probs, aux = linear_token_logprobs(
            hidden, weight, targets, bias=bias, temperature=temperature, softcap=final_logit_softcapping,
            logit_scale=1.0 if logit_scale is None else logit_scale, return_aux=request,
            options=_state["options"])
        return log_probs, aux.entropy, aux.log_sum_sq_probs, aux.mean_logits, aux.is_top1


def install(options: FusedOptions | None = None) -> None:
    """Make TRL's trainers compute their log-probs with :func:`lce_compile.linear_token_logprobs`.

    ``options`` default to :data:`TRL_OPTIONS`: an fp32 weight-gradient accumulator, as TRL's own kernel. Raises ``RuntimeError`` (and changes nothing) if the installed TRL has no such hook or a different
    signature. Calling it again only updates ``options``.
    """
    utils = importlib.import_module(_MODULE)
    current = getattr(utils, _NAME, None)
    options = TRL_OPTIONS if options is None else options
    if current is FusedLogProbFunction:
        _state["options"] = options
        return
    version = getattr(importlib.import_module("trl"), "__version__", "?")
    if current is None or not hasattr(current, "forward"):
        raise RuntimeError(f"lce_compile.integrations.trl.install: TRL {version} has no {_MODULE}.{_NAME}; "
                           f"this integration follows TRL 1.16's hook.")
    parameters = tuple(inspect.signature(current.forward).parameters)[1:]  # after ctx
    if parameters != _SIGNATURE:
        raise RuntimeError(f"lce_compile.integrations.trl.install: TRL {version}'s {_NAME}.forward takes "
                           f"{parameters}, not TRL 1.16's {_SIGNATURE}; nothing was installed.")
    _state["original"], _state["options"] = current, options
    setattr(utils, _NAME, FusedLogProbFunction)


def uninstall() -> None:
    """Put TRL's own function back; harmless when not installed."""
    if _state["original"] is not None:
        setattr(importlib.import_module(_MODULE), _NAME, _state["original"])
        _state["original"] = _state["options"] = None


@contextlib.contextmanager
def use(options: FusedOptions | None = None):
    """``with use(): trainer.train()`` installs for the block and uninstalls after it."""
    installed_before = _state["original"] is not None
    install(options)
    try:
        yield
    finally:
        if not installed_before:
            uninstall()
