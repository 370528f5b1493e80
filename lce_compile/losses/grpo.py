"""Fused GRPO-family policy losses (TRL's GRPOTrainer formulas): token-level ratios as one fused sum,
sequence-level (GSPO) ratios over fused log-probabilities."""
from __future__ import annotations

import torch
from torch import nn

from .. import checks
from ..policy import FusedOptions
from ..wrap import fused_call
from ._aux import AuxOutput, AuxRequest, aux_keys, stats_request
from ._rows import LOCAL, clipped_surrogate, clipped_tokens, k3_kl, target_log_probs, widen
from ._rows import entropy as row_entropy
from ._rows import log_prob_step
from .logprobs import check_sequences, check_temperature, token_logprobs

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
LEVELS = ("token", "sequence")


def _grpo_rows(logits, token_ids, row_weight, advantages, old=None, ref=None, *, temperature=1.0, beta=0.0,
               epsilon_low=0.2, epsilon_high=0.2, stats=False, vocab=LOCAL):
    """One chunk of token-level GRPO: each row's weighted loss (C,), so that the engine differentiates the
    chunk in the forward pass (three matmuls). ``row_weight`` holds the mask and the loss type's denominator."""
    z = widen(logits) / temperature
    logp, m, norm = target_log_probs(z, token_ids, vocab)
    value, ratio, kl = _grpo_terms(logp, row_weight, advantages, old, ref, beta, epsilon_low, epsilon_high)
    if not stats:
        return value
    clipped = clipped_tokens(ratio, advantages, epsilon_low, epsilon_high)
    aux = (clipped.float(), row_entropy(z, m, norm, vocab)) + (() if kl is None else (kl,))
    return value, tuple(a.detach() for a in aux)


def _grpo_terms(logp, row_weight, advantages, old, ref, beta, epsilon_low, epsilon_high):
    """Each row's weighted loss from its log-prob, with the ratio and the k3 KL (None without ``ref``)."""
    ratio = torch.exp(logp - (logp.detach() if old is None else old))
    loss = clipped_surrogate(ratio, advantages, epsilon_low, epsilon_high)
    kl = None if ref is None else k3_kl(ref, logp)
    if kl is not None and beta:
        loss = loss + beta * kl
    return torch.where(row_weight != 0, loss * row_weight, 0.0), ratio, kl


def _grpo_from_log_prob(logp, token_ids, row_weight, advantages, old=None, ref=None, *, beta=0.0, epsilon_low=0.2,
                        epsilon_high=0.2, **_):
    return _grpo_terms(logp, row_weight, advantages, old, ref, beta, epsilon_low, epsilon_high)[0]


def _grpo_eager_step(*, temperature=1.0, stats=False, vocab=LOCAL, **_):
    return None if stats or vocab is not LOCAL else log_prob_step(_grpo_from_log_prob, divisor=temperature)


_grpo_rows.eager_step = _grpo_eager_step


def linear_grpo_loss(hidden, weight, token_ids, completion_mask, advantages, *, old_logprobs=None,
                     ref_logprobs=None, beta: float = 0.0, epsilon_low: float = 0.2, epsilon_high: float = 0.2,
                     loss_type: str = "dapo", importance_sampling_level: str = "token", temperature: float = 1.0,
                     max_completion_length: int | None = None, bias=None, return_aux: AuxRequest | None = None,
                     options: FusedOptions | None = None, return_stats: bool = False):
    r"""GRPO-family policy loss (the formulas of TRL's GRPOTrainer) on fused per-token log-probabilities.

    The formulas and the defaults (``beta=0.0``, ``loss_type="dapo"``, ``epsilon_low = epsilon_high = 0.2``,
    token-level ratios) follow TRL 1.16's ``GRPOConfig``.

    Same value and gradients, up to float rounding, as the unfused code::

        logits = (hidden @ weight.T + bias).float() / temperature                 # (B, T, V); bias if given
        logp = logits.log_softmax(-1).gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)   # (B, T)
        m = completion_mask.float()
        old = logp.detach() if old_logprobs is None else old_logprobs
        if importance_sampling_level == "token":
            log_w = logp - old
        else:  # "sequence"
            log_w = ((logp - old) * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1)
        ratio, adv = log_w.exp(), advantages.unsqueeze(-1)
        loss_t = -torch.minimum(ratio * adv, ratio.clamp(1 - epsilon_low, 1 + epsilon_high) * adv)
        if ref_logprobs is not None and beta:                                     # the k3 KL estimate
            loss_t = loss_t + beta * ((ref_logprobs - logp).exp() - (ref_logprobs - logp) - 1)
        if loss_type == "grpo":
            loss = ((loss_t * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()
        elif loss_type == "dr_grpo":
            loss = (loss_t * m).sum() / (B * (max_completion_length or T))
        else:  # "bnpo", "dapo"
            loss = (loss_t * m).sum() / m.sum().clamp(min=1)

    Args:
        hidden (Tensor): ``(B, T, D)`` hidden states of the completion tokens' positions.
        weight (Tensor): ``(V, D)`` output layer; or split over the vocabulary across ranks (a ``Shard(0)`` DTensor
            beside a DTensor ``hidden``, or a ``VocabShard``: docs/distributed.md).
        token_ids (Tensor): ``(B, T)`` the sampled completion tokens.
        completion_mask (Tensor): ``(B, T)`` bool or 0/1: which tokens count. Empty sequences contribute 0.
        advantages (Tensor): ``(B,)`` one advantage per sequence.
        old_logprobs (Tensor, optional): ``(B, T)`` log-probabilities under the sampling policy. Default: the
            current ones, detached (ratio 1, the on-policy case).
        ref_logprobs (Tensor, optional): ``(B, T)`` under the reference model; required when ``beta != 0``.
        beta (float): KL coefficient. Default: 0.0.
        epsilon_low, epsilon_high (float): clipping range ``[1 - epsilon_low, 1 + epsilon_high]``. Default: 0.2.
        loss_type (str): ``"grpo"`` | ``"bnpo"`` | ``"dr_grpo"`` | ``"dapo"``. Default: ``"dapo"``.
        importance_sampling_level (str): ``"token"`` | ``"sequence"`` (GSPO). Default: ``"token"``.
        temperature (float): divides the logits, as when sampling. Default: 1.
        max_completion_length (int, optional): ``"dr_grpo"``'s constant denominator. Default: ``T``.
        return_aux (AuxRequest, optional): ``AuxRequest(stats=True)`` also returns, in ``AuxOutput.stats``, a
            dict of detached scalars for logging: ``"kl"`` (masked mean of the k3 estimate; only with
            ``ref_logprobs``), ``"clip_ratio"`` (fraction of tokens where the clipped term is the active one:
            ratio below ``1 - epsilon_low`` with ``A < 0``, or above ``1 + epsilon_high`` with ``A > 0``),
            ``"entropy"`` (masked mean).
        bias, options: as in :func:`linear_token_logprobs`.
        return_stats (bool): the old spelling of ``return_aux=AuxRequest(stats=True)``, returning
            ``(loss, stats)``; accepted with a ``DeprecationWarning``, removed in 0.2.0.
    Returns:
        an fp32 scalar, or ``(loss, AuxOutput)``.
    Token-level ratios make the loss a sum of per-row terms: the chunks are differentiated in the forward pass
    (three matmuls). Sequence-level ratios go through :func:`linear_token_logprobs` (four).
    """
    name = "linear_grpo_loss"
    legacy = return_stats
    return_stats = bool(aux_keys(name, stats_request(name, return_stats, return_aux), ("stats",)))
    b, t = check_sequences(name, hidden, token_ids, completion_mask)
    _check_grpo(name, advantages, old_logprobs, ref_logprobs, beta, epsilon_low, epsilon_high, loss_type,
                importance_sampling_level, max_completion_length, b, t, hidden)
    check_temperature(name, temperature)
    if importance_sampling_level == "token":
        out = _token_level_grpo(hidden, weight, token_ids, completion_mask, advantages, old_logprobs, ref_logprobs,
                                beta, epsilon_low, epsilon_high, loss_type, temperature, max_completion_length,
                                return_stats, bias, options)
        return with_stats(out, return_stats, legacy, return_aux)

    # sequence level: a token's ratio depends on its whole sequence, which chunks may split. The loss is then
    # plain PyTorch over the fused log-probabilities (whose chunks are recomputed in backward).
    def sequence_level(out, completion_mask, advantages, old_logprobs, ref_logprobs):
        logp, token_entropy = out if return_stats else (out, None)
        mask = completion_mask.to(logp.dtype)
        old = logp.detach() if old_logprobs is None else old_logprobs.to(logp.dtype)
        log_ratio = (logp - old) * mask
        log_ratio = log_ratio.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
        ratio = torch.exp(log_ratio)
        adv = advantages.to(logp.dtype).unsqueeze(-1)
        per_token = clipped_surrogate(ratio, adv, epsilon_low, epsilon_high)
        kl = None if ref_logprobs is None else k3_kl(ref_logprobs.to(logp.dtype), logp)
        if kl is not None and beta:
            per_token = per_token + beta * kl
        loss = (per_token * mask * _grpo_row_weight(mask, loss_type, max_completion_length)).sum()
        if not return_stats:
            return loss
        with torch.no_grad():
            clipped = clipped_tokens(ratio, adv, epsilon_low, epsilon_high)
            return loss, _grpo_stats(mask, clipped.expand_as(mask).float(), token_entropy, kl)

    # masked tokens' log-probs and entropies are multiplied by 0 above: they are not computed
    out = token_logprobs(name, hidden, weight, token_ids, bias=bias, temperature=temperature, options=options,
                         return_entropy=return_stats, kept=completion_mask,
                         extras=(completion_mask, advantages, old_logprobs, ref_logprobs), then=sequence_level)
    return with_stats(out, return_stats, legacy, return_aux)


def with_stats(out, return_stats, legacy, return_aux):
    """The return value: the loss; ``(loss, stats)`` for the deprecated return_stats; else (loss, AuxOutput)."""
    if return_aux is None and not legacy:
        return out
    loss, stats = out if return_stats else (out, None)
    return (loss, stats) if legacy else (loss, AuxOutput(stats=stats))


def _grpo_row_weight(mask, loss_type, max_completion_length):
    """(B, T) weight of each token's loss in the loss type's normalization (0 where the mask is 0)."""
    b, t = mask.shape
    if loss_type == "grpo":  # mean over sequences of each sequence's mean
        return mask / (mask.sum(-1, keepdim=True).clamp(min=1) * b)
    if loss_type == "dr_grpo":
        return mask / (b * (max_completion_length or t))
    return mask / mask.sum().clamp(min=1)  # bnpo, dapo


def _grpo_stats(mask, clipped, entropy, kl):
    tokens = mask.sum().clamp(min=1)
    stats = {"clip_ratio": (clipped * mask).sum() / tokens, "entropy": (entropy * mask).sum() / tokens}
    if kl is not None:
        stats["kl"] = (kl * mask).sum() / tokens
    return stats


def _token_level_grpo(hidden, weight, token_ids, completion_mask, advantages, old_logprobs, ref_logprobs, beta,
                      epsilon_low, epsilon_high, loss_type, temperature, max_completion_length, return_stats, bias,
                      options):
    name = "linear_grpo_loss"
    wide = torch.promote_types(hidden.dtype, torch.float32)  # the rows' dtype: fp32, fp64 inputs stay fp64
    mask = completion_mask.to(wide)
    row_weight = _grpo_row_weight(mask, loss_type, max_completion_length)
    rows = (row_weight, advantages.to(wide).unsqueeze(-1).expand_as(mask))
    keys = tuple(k for k, v in (("old", old_logprobs), ("ref", ref_logprobs)) if v is not None)
    rows += tuple(v.to(wide) for v in (old_logprobs, ref_logprobs) if v is not None)
    static = {"temperature": float(temperature), "beta": float(beta), "epsilon_low": float(epsilon_low),
              "epsilon_high": float(epsilon_high), "stats": return_stats}
    aux_keys = ("clipped", "entropy") + (("kl",) if ref_logprobs is not None else ()) if return_stats else ()

    def stats(out, mask):
        if not return_stats:
            return out
        loss, aux = out
        return loss, _grpo_stats(mask, aux["clipped"], aux["entropy"], aux.get("kl"))

    return fused_call(name, _grpo_rows, hidden, weight, bias, targets=token_ids, target_arg="token_ids",
                      ignore_index=None, rows=rows, row_keys=keys, static=static, returns="rows", reduction="sum",
                      aux_keys=aux_keys, options=options, kept=completion_mask, extras=(mask,), local_finish=stats)


def _check_grpo(name, advantages, old, ref, beta, epsilon_low, epsilon_high, loss_type, level,
                max_completion_length, b, t, hidden):
    if not isinstance(advantages, torch.Tensor) or tuple(advantages.shape) != (b,):
        got = tuple(advantages.shape) if isinstance(advantages, torch.Tensor) else type(advantages).__name__
        raise ValueError(f"{name}: advantages must have shape (B,) = ({b},), one per sequence, got {got}.")
    for arg, value in (("old_logprobs", old), ("ref_logprobs", ref)):
        if value is not None:
            checks.check_rows(name, arg, value, hidden)
            if value.dim() != 2 or not value.is_floating_point():
                raise ValueError(f"{name}: {arg} must be a float tensor of shape (B, T) = ({b}, {t}), "
                                 f"got {value.dtype} {tuple(value.shape)}.")
    if beta and ref is None:
        raise ValueError(f"{name}: beta={beta} needs ref_logprobs for its KL term; pass them, or beta=0.0.")
    _check_grpo_options(name, epsilon_low, epsilon_high, loss_type, level, max_completion_length)


def _check_grpo_options(name, epsilon_low, epsilon_high, loss_type, level, max_completion_length):
    if not (epsilon_low >= 0 and epsilon_high >= 0):
        raise ValueError(f"{name}: epsilon_low and epsilon_high must be >= 0, got {epsilon_low!r}, {epsilon_high!r}.")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"{name}: loss_type must be one of {', '.join(map(repr, LOSS_TYPES))}, got {loss_type!r}.")
    if level not in LEVELS:
        raise ValueError(f"{name}: importance_sampling_level must be 'token' or 'sequence', got {level!r}.")
    if max_completion_length is not None and (not isinstance(max_completion_length, int)
                                              or max_completion_length < 1):
        raise ValueError(f"{name}: max_completion_length must be a positive int or None, "
                         f"got {max_completion_length!r}.")


class LinearGRPOLoss(nn.Module):
    """:func:`linear_grpo_loss` as a module: ``forward(hidden, weight, token_ids, completion_mask, advantages,
    old_logprobs=None, ref_logprobs=None, bias=None)``; every keyword option is set (and checked) here."""

    def __init__(self, *, beta: float = 0.0, epsilon_low: float = 0.2, epsilon_high: float = 0.2,
                 loss_type: str = "dapo", importance_sampling_level: str = "token", temperature: float = 1.0,
                 max_completion_length: int | None = None, return_aux: AuxRequest | None = None,
                 options: FusedOptions | None = None, return_stats: bool = False):
        super().__init__()
        name = type(self).__name__
        aux_keys(name, return_aux, ("stats",))
        _check_grpo_options(name, epsilon_low, epsilon_high, loss_type, importance_sampling_level,
                            max_completion_length)
        check_temperature(name, temperature)
        self.beta, self.epsilon_low, self.epsilon_high = beta, epsilon_low, epsilon_high
        self.loss_type, self.importance_sampling_level = loss_type, importance_sampling_level
        self.temperature = temperature
        self.max_completion_length, self.return_aux, self.options = max_completion_length, return_aux, options
        self.return_stats = return_stats  # deprecated; warns at the call

    def forward(self, hidden, weight, token_ids, completion_mask, advantages, old_logprobs=None,
                ref_logprobs=None, bias=None):
        return linear_grpo_loss(
            hidden, weight, token_ids, completion_mask, advantages, old_logprobs=old_logprobs,
            ref_logprobs=ref_logprobs, beta=self.beta, epsilon_low=self.epsilon_low, epsilon_high=self.epsilon_high,
            loss_type=self.loss_type, importance_sampling_level=self.importance_sampling_level,
            temperature=self.temperature, max_completion_length=self.max_completion_length,
            return_aux=self.return_aux, return_stats=self.return_stats, bias=bias, options=self.options)

    def extra_repr(self):
        return (f"beta={self.beta}, epsilon_low={self.epsilon_low}, epsilon_high={self.epsilon_high}, "
                f"loss_type={self.loss_type!r}, importance_sampling_level={self.importance_sampling_level!r}, "
                f"temperature={self.temperature}, max_completion_length={self.max_completion_length}, "
                f"return_aux={self.return_aux!r}, options={self.options!r}")
