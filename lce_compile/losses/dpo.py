"""Fused DPO: the sigmoid preference loss over fused sequence log-probabilities."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import checks
from ..policy import FusedOptions
from ._aux import AuxRequest, aux_keys, stats_request
from .grpo import with_stats
from .logprobs import check_sequences, check_temperature, token_logprobs


def linear_dpo_loss(hidden, weight, token_ids, completion_mask, ref_logprobs, *, beta: float = 0.1,
                    label_smoothing: float = 0.0, temperature: float = 1.0, reduction: str = "mean", bias=None,
                    return_aux: AuxRequest | None = None, options: FusedOptions | None = None,
                    return_stats: bool = False):
    r"""DPO's sigmoid loss on fused sequence log-probabilities.

    The batch holds ``2B`` sequences: the ``B`` chosen ones, then their ``B`` rejected ones, in the same order.
    With ``logp = linear_token_logprobs(hidden, weight, token_ids, temperature=temperature)`` (2B, T)::

        seq = (logp * completion_mask).sum(-1)                        # (2B,) sequence log-probabilities
        ref = ref_logprobs if ref_logprobs.dim() == 1 else (ref_logprobs * completion_mask).sum(-1)
        margin = beta * ((seq[:B] - ref[:B]) - (seq[B:] - ref[B:]))  # (B,)
        loss = -(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)
        # "mean": loss.mean(), "sum": loss.sum(), "none": loss

    Args:
        hidden (Tensor): ``(2B, T, D)``; token_ids, completion_mask: ``(2B, T)``.
        ref_logprobs (Tensor): the reference model's log-probabilities, per sequence ``(2B,)`` or per token
            ``(2B, T)`` (then summed over ``completion_mask``).
        beta (float): temperature of the implicit reward. Default: 0.1.
        label_smoothing (float): in ``[0, 0.5)``, the conservative DPO's assumed label-noise rate. Default: 0.
        temperature, bias, options: as in :func:`linear_token_logprobs`.
        reduction (str): over pairs, ``"mean"`` | ``"sum"`` | ``"none"``. Default: ``"mean"``.
        return_aux (AuxRequest, optional): ``AuxRequest(stats=True)`` also returns, in ``AuxOutput.stats``,
            detached ``"chosen_rewards"`` and ``"rejected_rewards"`` (B,) (``beta * (seq - ref)``) and
            ``"reward_accuracy"`` (fraction of pairs with chosen > rejected).
        return_stats (bool): the old spelling of ``return_aux=AuxRequest(stats=True)``, returning
            ``(loss, stats)``; accepted with a ``DeprecationWarning``, removed in 0.2.0.
    Returns:
        the loss, or ``(loss, AuxOutput)``.
    """
    name = "linear_dpo_loss"
    legacy = return_stats
    return_stats = bool(aux_keys(name, stats_request(name, return_stats, return_aux), ("stats",)))
    n, t = check_sequences(name, hidden, token_ids, completion_mask)
    if n % 2:
        raise ValueError(f"{name}: hidden must hold 2B sequences (B chosen, then B rejected), got {n}.")
    checks.check_reduction(name, reduction)
    _check_dpo_smoothing(name, label_smoothing)
    if not isinstance(ref_logprobs, torch.Tensor) or tuple(ref_logprobs.shape) not in ((n,), (n, t)):
        got = tuple(ref_logprobs.shape) if isinstance(ref_logprobs, torch.Tensor) else type(ref_logprobs).__name__
        raise ValueError(f"{name}: ref_logprobs must have shape (2B,) = ({n},) or (2B, T) = ({n}, {t}), got {got}.")

    def preference(logp, completion_mask, ref_logprobs):
        mask = completion_mask.to(logp.dtype)
        seq = (logp * mask).sum(-1)
        ref = ref_logprobs.to(logp.dtype)
        ref = ref if ref.dim() == 1 else (ref * mask).sum(-1)
        rewards = beta * (seq - ref)
        chosen, rejected = rewards[: n // 2], rewards[n // 2:]
        margin = chosen - rejected
        loss = -(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)
        loss = loss.mean() if reduction == "mean" else loss.sum() if reduction == "sum" else loss
        if not return_stats:
            return loss
        return loss, {"chosen_rewards": chosen.detach(), "rejected_rewards": rejected.detach(),
                      "reward_accuracy": (chosen > rejected).float().mean().detach()}

    # masked tokens' log-probs are multiplied by 0 in the sequence sums: they are not computed
    out = token_logprobs(name, hidden, weight, token_ids, bias=bias, temperature=temperature, options=options,
                         kept=completion_mask, extras=(completion_mask, ref_logprobs), then=preference)
    return with_stats(out, return_stats, legacy, return_aux)


def _check_dpo_smoothing(name, label_smoothing):
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"{name}: label_smoothing must be in [0, 0.5), got {label_smoothing!r}.")


class LinearDPOLoss(nn.Module):
    """:func:`linear_dpo_loss` as a module: ``forward(hidden, weight, token_ids, completion_mask, ref_logprobs,
    bias=None)``; every keyword option is set (and checked) here."""

    def __init__(self, *, beta: float = 0.1, label_smoothing: float = 0.0, temperature: float = 1.0,
                 reduction: str = "mean", return_aux: AuxRequest | None = None,
                 options: FusedOptions | None = None, return_stats: bool = False):
        super().__init__()
        name = type(self).__name__
        aux_keys(name, return_aux, ("stats",))
        checks.check_reduction(name, reduction)
        _check_dpo_smoothing(name, label_smoothing)
        check_temperature(name, temperature)
        self.beta, self.label_smoothing, self.temperature = beta, label_smoothing, temperature
        self.reduction, self.return_aux, self.return_stats, self.options = reduction, return_aux, return_stats, options

    def forward(self, hidden, weight, token_ids, completion_mask, ref_logprobs, bias=None):
        return linear_dpo_loss(hidden, weight, token_ids, completion_mask, ref_logprobs, beta=self.beta,
                               label_smoothing=self.label_smoothing, temperature=self.temperature,
                               reduction=self.reduction, return_aux=self.return_aux, return_stats=self.return_stats,
                               bias=bias, options=self.options)

    def extra_repr(self):
        return (f"beta={self.beta}, label_smoothing={self.label_smoothing}, temperature={self.temperature}, "
                f"reduction={self.reduction!r}, return_aux={self.return_aux!r}, options={self.options!r}")
