"""RL and preference losses: fused per-token log-probabilities, the GRPO family and DPO on top of them."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import checks, parallel
from ..engine import Plan, accumulation_dtype
from ..boundary import fused_call
from ..parallel import LOCAL
from ..policy import DEFAULT_OPTIONS, FusedOptions
from ._aux import AuxOutput, AuxRequest, aux_keys, stats_request
from ._rows import clipped_surrogate, clipped_tokens, k3_kl, target_log_prob, widen
from ._rows import entropy as row_entropy

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
LEVELS = ("token", "sequence")


_LOGPROB_AUX = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")  # the AuxRequest fields log-probs give


def _logprob_rows(logits, token_ids, *, temperature=1.0, logit_scale=1.0, softcap=None, entropy=False,
                  aux_keys=(), vocab=LOCAL):
    """One chunk: log p(token), (C,), or (C, 2) with the row's entropy too, under softmax(z) for
    z = softcap(logits * logit_scale) / temperature; plus the requested detached statistics of z."""
    z = widen(logits)
    if logit_scale != 1.0:
        z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    logp, lse = target_log_prob(z, token_ids, vocab)
    value = torch.stack((logp, row_entropy(z, lse, vocab)), dim=-1) if entropy else logp
    if not aux_keys:
        return value
    stats = {"log_sum_sq_probs": lambda: vocab.logsumexp(2 * z) - 2 * lse,  # log sum_v p_v^2
             "mean_logits": lambda: vocab.sum(z) / vocab.size(z),
             "is_top1": lambda: vocab.argmax(z) == token_ids}  # argmax takes the first of tied maxima
    return value, tuple(stats[key]().detach() for key in aux_keys)


def _grpo_rows(logits, token_ids, row_weight, advantages, old=None, ref=None, *, temperature=1.0, beta=0.0,
               epsilon_low=0.2, epsilon_high=0.2, stats=False, vocab=LOCAL):
    """One chunk of token-level GRPO: each row's weighted loss (C,), so that the engine differentiates the
    chunk in the forward pass (three matmuls). ``row_weight`` holds the mask and the loss type's denominator."""
    z = widen(logits) / temperature
    logp, lse = target_log_prob(z, token_ids, vocab)
    ratio = torch.exp(logp - (logp.detach() if old is None else old))
    loss = clipped_surrogate(ratio, advantages, epsilon_low, epsilon_high)
    kl = None if ref is None else k3_kl(ref, logp)
    if kl is not None and beta:
        loss = loss + beta * kl
    value = torch.where(row_weight != 0, loss * row_weight, 0.0)
    if not stats:
        return value
    clipped = clipped_tokens(ratio, advantages, epsilon_low, epsilon_high)
    aux = (clipped.float(), row_entropy(z, lse, vocab)) + (() if kl is None else (kl,))
    return value, tuple(a.detach() for a in aux)


def linear_token_logprobs(hidden, weight, token_ids, *, bias=None, temperature: float = 1.0,
                          softcap: float | None = None, logit_scale: float = 1.0, return_entropy: bool = False,
                          return_aux: AuxRequest | None = None, options: FusedOptions | None = None):
    r"""Log-probability of each chosen token under ``softmax(hidden @ weight.T / temperature)``, fused.

    Same values and gradients, up to float rounding, as the unfused code::

        logits = (hidden @ weight.T + bias).float()                          # (..., V); bias if given
        logits = logits * logit_scale                                        # if logit_scale != 1
        logits = softcap * torch.tanh(logits / softcap)                      # if softcap is not None
        logits = logits / temperature
        logprobs = logits.log_softmax(-1).gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)
        entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)     # if return_entropy
        log_sum_sq_probs = (2 * logits.log_softmax(-1)).logsumexp(-1)        # the AuxRequest fields, detached
        mean_logits = logits.mean(-1)
        is_top1 = logits.argmax(-1) == token_ids

    Args:
        hidden (Tensor): ``(..., D)`` final hidden states.
        weight (Tensor): ``(V, D)`` output layer; or split over the vocabulary across ranks (a ``Shard(0)`` DTensor
            beside a DTensor ``hidden``, or a ``VocabShard``: docs/distributed.md).
        token_ids (Tensor): ``(...)`` integer ids in ``[0, V)``, hidden's leading shape.
        temperature (float): divides the logits (sampling temperature), last. Default: 1.
        softcap (float, optional): Gemma's ``softcap * tanh(logits / softcap)``, after ``logit_scale``.
        logit_scale (float): multiplies the fp32 logits first. Default: 1.
        return_entropy (bool): also return each row's entropy (differentiable too), as ``(logprobs, entropy)``.
            Default: ``False``.
        return_aux (AuxRequest, optional): returns ``(logprobs, AuxOutput)``: ``entropy`` (differentiable),
            ``log_sum_sq_probs``, ``mean_logits``, ``is_top1`` (first argmax on ties) as requested.
        bias (Tensor, optional): ``(V,)`` output-layer bias.
        options (FusedOptions, optional): engine knobs.
    Returns:
        Tensor ``logprobs`` of ``token_ids.shape`` (fp32), ``(logprobs, entropy)`` or ``(logprobs, AuxOutput)``.
        Any upstream gradient flows back to ``hidden``, ``weight`` and ``bias`` (the chunks are recomputed in
        backward).
    Memory: the gradients plus one ``(C, V)`` chunk; never ``(N, V)``.
    """
    name = "linear_token_logprobs"
    hidden, weight, bias, (token_ids,), vocab, finish = parallel.localize(name, hidden, weight, bias, token_ids)
    return finish(_token_logprobs(name, vocab, hidden, weight, token_ids, bias=bias, temperature=temperature,
                                  softcap=softcap, logit_scale=logit_scale, return_entropy=return_entropy,
                                  return_aux=return_aux, options=options))


def _token_logprobs(name, vocab, hidden, weight, token_ids, *, bias, temperature, options, softcap=None,
                    logit_scale=1.0, return_entropy=False, return_aux=None):
    """linear_token_logprobs on this rank's tensors (see parallel.localize)."""
    options = _check_logprob_inputs(name, hidden, weight, token_ids, temperature, bias, options, vocab)
    _check_transform(name, softcap, logit_scale)
    requested = aux_keys(name, return_aux, _LOGPROB_AUX)
    with_entropy = return_entropy or "entropy" in requested
    detached = tuple(key for key in requested if key != "entropy")
    static = {"temperature": temperature, "logit_scale": logit_scale, "softcap": softcap, "entropy": with_entropy,
              "aux_keys": detached, "vocab": vocab}
    plan = Plan(name, _logprob_rows, "rows", "none", static, options, row_shape=(2,) if with_entropy else (),
                aux_keys=detached)
    out = fused_call(plan, hidden, weight, bias, (token_ids.long(),))
    out, stats = out if detached else (out, ())
    logp, entropy = (out[..., 0], out[..., 1]) if with_entropy else (out, None)
    if return_aux is not None:
        return logp, AuxOutput(entropy=entropy, **dict(zip(detached, stats)))
    return (logp, entropy) if return_entropy else logp


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
        log_w = logp - old                                                        # importance_sampling_level="token"
        log_w = ((logp - old) * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1)   # ="sequence"
        ratio, adv = log_w.exp(), advantages.unsqueeze(-1)
        loss_t = -torch.minimum(ratio * adv, ratio.clamp(1 - epsilon_low, 1 + epsilon_high) * adv)
        if ref_logprobs is not None and beta:                                     # the k3 KL estimate
            loss_t = loss_t + beta * ((ref_logprobs - logp).exp() - (ref_logprobs - logp) - 1)
        loss = ((loss_t * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()             # loss_type="grpo"
        loss = (loss_t * m).sum() / m.sum().clamp(min=1)                          # "bnpo", "dapo"
        loss = (loss_t * m).sum() / (B * (max_completion_length or T))            # "dr_grpo"

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
            ``(loss, stats)``; accepted with a ``DeprecationWarning`` for one release.
    Returns:
        an fp32 scalar, or ``(loss, AuxOutput)``.
    Token-level ratios make the loss a sum of per-row terms: the chunks are differentiated in the forward pass
    (three matmuls). Sequence-level ratios go through :func:`linear_token_logprobs` (four).
    """
    name = "linear_grpo_loss"
    hidden, weight, bias, (token_ids, completion_mask, advantages, old_logprobs, ref_logprobs), vocab, finish = (
        parallel.localize(name, hidden, weight, bias, token_ids, completion_mask, advantages, old_logprobs,
                          ref_logprobs))
    legacy = return_stats
    return_stats = bool(aux_keys(name, stats_request(name, return_stats, return_aux), ("stats",)))
    b, t = _check_sequences(name, hidden, token_ids, completion_mask)
    _check_grpo(name, advantages, old_logprobs, ref_logprobs, beta, epsilon_low, epsilon_high, loss_type,
                importance_sampling_level, max_completion_length, b, t, hidden)
    if importance_sampling_level == "token":
        out = _token_level_grpo(hidden, weight, token_ids, completion_mask, advantages, old_logprobs, ref_logprobs,
                                beta, epsilon_low, epsilon_high, loss_type, temperature, max_completion_length,
                                return_stats, bias, options, vocab)
        return finish(_with_stats(out, return_stats, legacy, return_aux))
    # sequence level: a token's ratio depends on its whole sequence, which chunks may split. The loss is then
    # plain PyTorch over the fused log-probabilities (whose chunks are recomputed in backward).
    out = _token_logprobs(name, vocab, hidden, weight, token_ids, bias=bias, temperature=temperature,
                          options=options, return_entropy=return_stats)
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
        return finish(_with_stats(loss, return_stats, legacy, return_aux))
    with torch.no_grad():
        clipped = clipped_tokens(ratio, adv, epsilon_low, epsilon_high)
        stats = _grpo_stats(mask, clipped.expand_as(mask).float(), token_entropy, kl)
    return finish(_with_stats((loss, stats), return_stats, legacy, return_aux))


def _with_stats(out, return_stats, legacy, return_aux):
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
                      options, vocab):
    name = "linear_grpo_loss"
    options = _check_logprob_inputs(name, hidden, weight, token_ids, temperature, bias, options, vocab)
    wide = accumulation_dtype(hidden)  # the rows' dtype: fp32, fp64 inputs stay fp64
    mask = completion_mask.to(wide)
    row_weight = _grpo_row_weight(mask, loss_type, max_completion_length)
    rows = (token_ids.long(), row_weight, advantages.to(wide).unsqueeze(-1).expand_as(mask))
    keys = tuple(k for k, v in (("old", old_logprobs), ("ref", ref_logprobs)) if v is not None)
    rows += tuple(v.to(wide) for v in (old_logprobs, ref_logprobs) if v is not None)
    static = {"temperature": temperature, "beta": beta, "epsilon_low": epsilon_low, "epsilon_high": epsilon_high,
              "stats": return_stats, "vocab": vocab}
    aux_keys = ("clipped", "entropy") + (("kl",) if ref_logprobs is not None else ()) if return_stats else ()
    plan = Plan(name, _grpo_rows, "rows", "sum", static, options, row_keys=keys, aux_keys=aux_keys)
    out = fused_call(plan, hidden, weight, bias, rows)
    if not return_stats:
        return out
    loss, aux = out
    aux = dict(zip(aux_keys, aux))
    return loss, _grpo_stats(mask, aux["clipped"], aux["entropy"], aux.get("kl"))


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
            ``(loss, stats)``; accepted with a ``DeprecationWarning`` for one release.
    Returns:
        the loss, or ``(loss, AuxOutput)``.
    """
    name = "linear_dpo_loss"
    hidden, weight, bias, (token_ids, completion_mask, ref_logprobs), vocab, finish = parallel.localize(
        name, hidden, weight, bias, token_ids, completion_mask, ref_logprobs)
    legacy = return_stats
    return_stats = bool(aux_keys(name, stats_request(name, return_stats, return_aux), ("stats",)))
    n, t = _check_sequences(name, hidden, token_ids, completion_mask)
    if n % 2:
        raise ValueError(f"{name}: hidden must hold 2B sequences (B chosen, then B rejected), got {n}.")
    checks.check_reduction(name, reduction)
    _check_dpo_smoothing(name, label_smoothing)
    if not isinstance(ref_logprobs, torch.Tensor) or tuple(ref_logprobs.shape) not in ((n,), (n, t)):
        got = tuple(ref_logprobs.shape) if isinstance(ref_logprobs, torch.Tensor) else type(ref_logprobs).__name__
        raise ValueError(f"{name}: ref_logprobs must have shape (2B,) = ({n},) or (2B, T) = ({n}, {t}), got {got}.")
    logp = _token_logprobs(name, vocab, hidden, weight, token_ids, bias=bias, temperature=temperature, options=options)
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
        return finish(_with_stats(loss, return_stats, legacy, return_aux))
    stats = {"chosen_rewards": chosen.detach(), "rejected_rewards": rejected.detach(),
             "reward_accuracy": (chosen > rejected).float().mean().detach()}
    return finish(_with_stats((loss, stats), return_stats, legacy, return_aux))


def _check_logprob_inputs(name, hidden, weight, token_ids, temperature, bias, options, vocab) -> FusedOptions:
    """The head, token ids in [0, V) and the temperature; returns the options to use."""
    options = options or DEFAULT_OPTIONS
    checks.check_head(name, hidden, weight, bias)
    checks.check_targets(name, token_ids, hidden, vocab.total(weight), None, options.validate, arg="token_ids")
    _check_temperature(name, temperature)
    return options


def _check_transform(name, softcap, logit_scale):
    if softcap is not None and not softcap > 0:
        raise ValueError(f"{name}: softcap must be a positive float or None, got {softcap!r}.")
    if not (isinstance(logit_scale, (int, float)) and math.isfinite(logit_scale) and logit_scale != 0):
        raise ValueError(f"{name}: logit_scale must be a finite nonzero float, got {logit_scale!r}.")


def _check_dpo_smoothing(name, label_smoothing):
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"{name}: label_smoothing must be in [0, 0.5), got {label_smoothing!r}.")


def _check_temperature(name, temperature):
    if not temperature > 0:
        raise ValueError(f"{name}: temperature must be > 0, got {temperature!r}.")


def _check_sequences(name, hidden, token_ids, completion_mask):
    """hidden (B, T, D), token_ids and completion_mask (B, T); returns (B, T)."""
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        got = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
        raise ValueError(f"{name}: hidden must have shape (B, T, D), got {got}.")
    b, t = hidden.shape[:2]
    checks.check_rows(name, "completion_mask", completion_mask, hidden)
    if completion_mask.dim() != 2:
        raise ValueError(f"{name}: completion_mask must have shape (B, T) = ({b}, {t}), "
                         f"got {tuple(completion_mask.shape)}.")
    if completion_mask.is_complex():
        raise TypeError(f"{name}: completion_mask must be bool, 0/1 integers or floats, got {completion_mask.dtype}.")
    return b, t


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


class LinearTokenLogprobs(nn.Module):
    """:func:`linear_token_logprobs` as a module: ``forward(hidden, weight, token_ids, bias=None)``."""

    def __init__(self, *, temperature: float = 1.0, softcap: float | None = None, logit_scale: float = 1.0,
                 return_entropy: bool = False, return_aux: AuxRequest | None = None,
                 options: FusedOptions | None = None):
        super().__init__()
        name = type(self).__name__
        _check_temperature(name, temperature)
        _check_transform(name, softcap, logit_scale)
        aux_keys(name, return_aux, _LOGPROB_AUX)
        self.temperature, self.softcap, self.logit_scale = temperature, softcap, logit_scale
        self.return_entropy, self.return_aux, self.options = return_entropy, return_aux, options

    def forward(self, hidden, weight, token_ids, bias=None):
        return linear_token_logprobs(hidden, weight, token_ids, temperature=self.temperature, softcap=self.softcap,
                                     logit_scale=self.logit_scale, return_entropy=self.return_entropy,
                                     return_aux=self.return_aux, bias=bias, options=self.options)

    def extra_repr(self):
        return (f"temperature={self.temperature}, softcap={self.softcap}, logit_scale={self.logit_scale}, "
                f"return_entropy={self.return_entropy}, return_aux={self.return_aux!r}, options={self.options!r}")


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
        _check_temperature(name, temperature)
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
        _check_temperature(name, temperature)
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
