"""The one request type for optional outputs beside a loss: ``return_aux=AuxRequest(...)`` -> ``(loss, AuxOutput)``.

Each loss supports the fields that mean something for it and refuses the others by name, so one spelling serves
every loss that has optional outputs (as FlexAttention's ``return_aux`` replaced its ``return_lse`` bool)."""
from __future__ import annotations

import dataclasses
import warnings
from typing import NamedTuple, Optional

import torch


@dataclasses.dataclass(frozen=True)
class AuxRequest:
    """Which outputs to return beside the loss, as ``(loss, AuxOutput)``.

    Per token, in the tokens' shape (detached unless said otherwise):
        loss (bool): cross-entropy: each token's loss before reduction (0 for ignored tokens).
        lse (bool): cross-entropy: ``logsumexp`` of the (softcapped) fp32 logits.
        correct (bool): cross-entropy: whether ``argmax(logits) == target`` (``False`` for ignored tokens).
        entropy (bool): token log-probs: each row's entropy, differentiable like the log-probs.
        log_sum_sq_probs, mean_logits, is_top1 (bool): token log-probs: ``log sum_v p_v ** 2``, the mean of the
            (transformed) logits, whether the token is the first argmax.
    For logging:
        stats (bool): GRPO and DPO: a dict of detached logging values (see each loss).
    """

    loss: bool = False
    lse: bool = False
    correct: bool = False
    entropy: bool = False
    log_sum_sq_probs: bool = False
    mean_logits: bool = False
    is_top1: bool = False
    stats: bool = False

    def keys(self) -> tuple:
        return tuple(f.name for f in dataclasses.fields(self) if getattr(self, f.name))


class AuxOutput(NamedTuple):
    """The outputs requested by :class:`AuxRequest`; unrequested ones are ``None``."""

    loss: Optional[torch.Tensor] = None
    lse: Optional[torch.Tensor] = None
    correct: Optional[torch.Tensor] = None
    entropy: Optional[torch.Tensor] = None
    log_sum_sq_probs: Optional[torch.Tensor] = None
    mean_logits: Optional[torch.Tensor] = None
    is_top1: Optional[torch.Tensor] = None
    stats: Optional[dict] = None


def aux_keys(name: str, return_aux, supported: tuple) -> tuple:
    """The requested field names, after checking ``return_aux`` is an AuxRequest of fields ``name`` supports."""
    if return_aux is None:
        return ()
    if not isinstance(return_aux, AuxRequest):
        raise TypeError(f"{name}: return_aux must be an AuxRequest or None, got {type(return_aux).__name__}.")
    unsupported = [key for key in return_aux.keys() if key not in supported]
    if unsupported:
        raise ValueError(f"{name}: return_aux asks for {', '.join(unsupported)}, which this loss does not give; "
                         f"it gives {', '.join(supported)}.")
    return return_aux.keys()


def stats_request(name: str, return_stats: bool, return_aux):
    """``return_aux`` for the deprecated ``return_stats=True`` (removed in 0.2.0), with its warning."""
    if not return_stats:
        return return_aux
    if return_aux is not None:
        raise TypeError(f"{name}: got both return_stats= and return_aux=; pass return_aux=AuxRequest(stats=True).")
    warnings.warn(f"{name}: return_stats=True is now return_aux=AuxRequest(stats=True), which returns "
                  f"(loss, AuxOutput) with the dict in .stats; return_stats is removed in 0.2.0.",
                  DeprecationWarning, stacklevel=3)
    return AuxRequest(stats=True)
