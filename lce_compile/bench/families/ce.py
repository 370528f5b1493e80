"""``--loss ce``: cross-entropy, the mean over the kept tokens (``ignore_index=-100``)."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .base import IGNORE_INDEX, Family, Method, needs_module, wide_logits

SOFTCAP, Z_LOSS = 30.0, 1e-4  # the fused_softcap method's settings (Gemma-2 caps its logits at 30)


def unfused_cross_entropy(hidden, weight, targets):
    """The unfused code every fused method replaces: full (N, V) logits, upcast to fp32."""
    return F.cross_entropy((hidden @ weight.T).float(), targets, ignore_index=IGNORE_INDEX)


def reference_cross_entropy(hidden, weight, targets, reduction="mean", softcap=None, z_loss=0.0):
    """Mean (or with ``reduction="sum"``, sum) over kept tokens of ``-log softmax(logits)[target]``, the
    logits optionally soft-capped, plus ``z_loss * logsumexp(logits)^2``."""
    logits = wide_logits(hidden, weight)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    loss = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="none")
    if z_loss:
        loss = loss + z_loss * logits.logsumexp(-1).square() * (targets != IGNORE_INDEX)
    return loss.sum() / (targets != IGNORE_INDEX).sum() if reduction == "mean" else loss.sum()


reference_softcap = functools.partial(reference_cross_entropy, softcap=SOFTCAP, z_loss=Z_LOSS)


def _torch_lce_unavailable(device):
    if not hasattr(F, "linear_cross_entropy") or not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        return f"needs torch >= 2.13 (F.linear_cross_entropy with options=), this is {torch.__version__}"
    return None


def _make_fused(**options):
    """lce_compile.linear_cross_entropy with ``options=FusedOptions(**options)`` if any are given."""
    from lce_compile import FusedOptions, linear_cross_entropy
    extra = {"options": FusedOptions(**options)} if options else {}
    return functools.partial(linear_cross_entropy, ignore_index=IGNORE_INDEX, **extra)


def _make_fused_softcap():
    from lce_compile import linear_cross_entropy
    return functools.partial(linear_cross_entropy, ignore_index=IGNORE_INDEX, softcap=SOFTCAP, z_loss=Z_LOSS)


def _make_fused_generic(upcast=True):
    # F.cross_entropy is one of fused_loss's known functions: its "mean" is PyTorch's global mean.
    # upcast=False hands it the logits in the matmul's dtype (the pre-upcast behaviour): a bf16 loss in bf16.
    from lce_compile import fused_loss
    return functools.partial(fused_loss(F.cross_entropy, upcast=upcast), ignore_index=IGNORE_INDEX)


def _make_torch_lce():
    # options=LinearCrossEntropyOptions() opts into PyTorch's chunked path; options=None is unfused.
    return functools.partial(F.linear_cross_entropy, ignore_index=IGNORE_INDEX,
                             options=torch.nn.LinearCrossEntropyOptions())


def _make_liger():
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    module = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX)

    def liger(hidden, weight, targets):
        out = module(weight, hidden, targets)  # Liger's order: (lin_weight, input, target)
        return out[0] if isinstance(out, tuple) else out  # some versions return (loss, z_loss)
    return liger


def _make_cce():
    from cut_cross_entropy import linear_cross_entropy
    return functools.partial(linear_cross_entropy, ignore_index=IGNORE_INDEX, reduction="mean")


METHODS = {
    "eager": Method(lambda: unfused_cross_entropy, "unfused: F.cross_entropy((hidden @ weight.T).float(), targets)"),
    # CPU opt-in: Inductor's C++ build takes minutes per shape there.
    "compile": Method(lambda: torch.compile(unfused_cross_entropy), "torch.compile of the unfused code",
                      default_on=("cuda",), compiles=True),
    # lce_compile compiles its chunk functions on CUDA, and on the CPU for large calls
    "fused": Method(_make_fused, "lce_compile.linear_cross_entropy, default options", compiles=True,
                    make_at=lambda memory: _make_fused(chunk_memory=memory), lce_compile=True),
    "fused_compiled": Method(functools.partial(_make_fused, compile=True),
                             "lce_compile.linear_cross_entropy, FusedOptions(compile=True)", default_on=(),
                             compiles=True, lce_compile=True),
    "fused_lean": Method(functools.partial(_make_fused, chunk_memory=0.1),
                         "lce_compile.linear_cross_entropy, FusedOptions(chunk_memory=0.1)", default_on=("cuda",),
                         compiles=True, lce_compile=True),
    "fused_softcap": Method(_make_fused_softcap, f"lce_compile.linear_cross_entropy, softcap={SOFTCAP}, "
                            f"z_loss={Z_LOSS}", default_on=(), compiles=True, reference=reference_softcap,
                            lce_compile=True),
    "fused_generic": Method(_make_fused_generic, "lce_compile.fused_loss(F.cross_entropy)", default_on=("cuda",),
                            compiles=True, lce_compile=True),
    "fused_generic_matmul_dtype": Method(functools.partial(_make_fused_generic, upcast=False),
                                         "lce_compile.fused_loss(F.cross_entropy, upcast=False)", default_on=(),
                                         compiles=True, lce_compile=True),
    # opt-in on the CPU, where one cpu-large step takes as long as eager's: the default run stays < 2 min
    "torch_lce": Method(_make_torch_lce, "F.linear_cross_entropy(..., options=LinearCrossEntropyOptions())",
                        unavailable=_torch_lce_unavailable, default_on=("cuda",)),
    "liger": Method(_make_liger, "liger_kernel LigerFusedLinearCrossEntropyLoss",
                    unavailable=needs_module("liger_kernel"), default_on=("cuda",)),
    "cce": Method(_make_cce, "cut_cross_entropy.linear_cross_entropy",
                  unavailable=needs_module("cut_cross_entropy"), default_on=("cuda",)),
}

CE = Family("ce", "cross-entropy: mean over kept tokens of -log p(target) (ignore_index=-100)",
            reference=reference_cross_entropy, methods=METHODS, chunkable_reference=True)
