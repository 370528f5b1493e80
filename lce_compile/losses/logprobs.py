"""Fused token log-probabilities (and entropy): what RL losses and trainers read off the policy's head."""
from __future__ import annotations

import torch
from torch import nn

from .. import checks
from ..policy import FusedOptions
from ..wrap import fused_call
from ._aux import AuxOutput, AuxRequest, aux_keys
from ._rows import LOCAL, check_transform, log_prob_step, target_log_probs, widen
from ._rows import entropy as row_entropy

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
    logp, m, norm = target_log_probs(z, token_ids, vocab)
    value = torch.stack((logp, row_entropy(z, m, norm, vocab)), dim=-1) if entropy else logp
    if not aux_keys:
        return value
    # log sum_v p_v^2 = log sum_v exp(2 (z_v - m)) - 2 L: the shift keeps the confident rows' digits
    stats = {"log_sum_sq_probs": lambda: vocab.logsumexp(2 * (z - m.unsqueeze(-1))) - 2 * norm,
             "mean_logits": lambda: vocab.sum(z) / vocab.size(z),
             "is_top1": lambda: vocab.argmax(z) == token_ids}  # argmax takes the first of tied maxima
    return value, tuple(stats[key]().detach() for key in aux_keys)


def _log_prob_itself(logp, token_ids, **_):
    return logp


def _with_entropy(logp, entropy_of_row, token_ids, **_):
    return torch.stack((logp, entropy_of_row), dim=-1)


def _logprob_eager_step(*, temperature=1.0, logit_scale=1.0, softcap=None, entropy=False, aux_keys=(), vocab=LOCAL,
                        **_):
    if softcap is not None or aux_keys or vocab is not LOCAL:
        return None
    value = _with_entropy if entropy else _log_prob_itself
    return log_prob_step(value, scale=logit_scale, divisor=temperature, entropy=entropy)


_logprob_rows.eager_step = _logprob_eager_step


def linear_token_logprobs(hidden, weight, token_ids, *, mask=None, bias=None, temperature: float = 1.0,
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
        logprobs = torch.where(mask, logprobs, 0)                            # if mask: entropy and stats alike

    Args:
        hidden (Tensor): ``(..., D)`` final hidden states.
        weight (Tensor): ``(V, D)`` output layer; or split over the vocabulary across ranks (a ``Shard(0)`` DTensor
            beside a DTensor ``hidden``, or a ``VocabShard``: docs/distributed.md).
        token_ids (Tensor): ``(...)`` integer ids in ``[0, V)``, hidden's leading shape.
        mask (Tensor, optional): ``token_ids.shape``, bool or 0/1 integers: the tokens to compute (a completion
            mask). Masked tokens are not computed: their log-prob, entropy and statistics are 0, their rows of
            ``hidden`` get an exact 0 gradient, and they add nothing to ``weight``'s and ``bias``'s. A float mask
            raises ``TypeError``. Their ``token_ids`` are still checked in ``[0, V)``.
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

    .. note::
        With ``mask``, the masked rows are gathered out before the matmuls when the call validates (their count
        comes back with the token-id check's one read-back). With ``FusedOptions(validate=False)``, inside
        ``torch.compile`` or while a CUDA graph captures, every row is computed and the masked ones are set to 0
        afterwards: the same values and gradients, at the cost of every row.
    """
    name = "linear_token_logprobs"
    if mask is not None:
        check_mask(name, mask, hidden)
    return token_logprobs(name, hidden, weight, token_ids, bias=bias, temperature=temperature, softcap=softcap,
                          logit_scale=logit_scale, return_entropy=return_entropy, return_aux=return_aux,
                          options=options, kept=mask, extras=() if mask is None else (mask,),
                          then=None if mask is None else _zero_masked)


def check_mask(name, mask, hidden):
    """A token mask: bool or integer (0/1), exactly hidden's leading shape (the token ids' shape)."""
    checks.check_rows(name, "mask", mask, hidden)
    if mask.dim() != hidden.dim() - 1:
        raise ValueError(f"{name}: mask must have token_ids' shape {tuple(hidden.shape[:-1])}, "
                         f"got {tuple(mask.shape)}.")
    if mask.dtype.is_floating_point or mask.dtype.is_complex:
        raise TypeError(f"{name}: mask must be a bool or 0/1 integer tensor, got {mask.dtype}. Pass mask.bool(), "
                        "or multiply the log-probs by a float weight.")


def _zero_masked(result, mask):
    """The masked tokens' documented 0 in every mode: the rows the engine computed anyway (no read-back to gather
    them out: validate=False, torch.compile, CUDA graphs) are set to 0, and so is their upstream gradient."""
    keep = mask.to(torch.bool)

    def zero(t):
        return None if t is None else torch.where(keep, t, t.new_zeros(()))  # new_zeros: is_top1 stays bool

    if isinstance(result, torch.Tensor):
        return zero(result)
    logp, second = result
    if isinstance(second, AuxOutput):
        return zero(logp), AuxOutput(*(zero(t) for t in second))
    return zero(logp), zero(second)


def token_logprobs(name, hidden, weight, token_ids, *, bias, temperature, options, softcap=None, logit_scale=1.0,
                   return_entropy=False, return_aux=None, kept=None, extras=(), then=None):
    """linear_token_logprobs under the caller's ``name``; ``then(result, *extras)``, if given, turns the result
    into the caller's on this rank's tensors (``extras`` localized like the inputs). ``kept``: the tokens whose
    results the caller uses (a completion mask); the others come back as 0, uncomputed."""
    check_temperature(name, temperature)
    check_transform(name, logit_scale, softcap)
    requested = aux_keys(name, return_aux, _LOGPROB_AUX)
    with_entropy = return_entropy or "entropy" in requested
    detached = tuple(key for key in requested if key != "entropy")
    static = {"temperature": float(temperature), "logit_scale": logit_scale, "softcap": softcap,
              "entropy": with_entropy, "aux_keys": detached}

    def unpack(out, *extras):
        out, stats = out if detached else (out, {})
        logp, entropy = (out[..., 0], out[..., 1]) if with_entropy else (out, None)
        if return_aux is not None:
            result = logp, AuxOutput(entropy=entropy, **stats)
        else:
            result = (logp, entropy) if return_entropy else logp
        return result if then is None else then(result, *extras)

    return fused_call(name, _logprob_rows, hidden, weight, bias, targets=token_ids, target_arg="token_ids",
                      ignore_index=None, static=static, row_shape=(2,) if with_entropy else (), aux_keys=detached,
                      options=options, kept=kept, extras=extras, local_finish=unpack)


def check_temperature(name, temperature):
    if not temperature > 0:
        raise ValueError(f"{name}: temperature must be > 0, got {temperature!r}.")


def check_sequences(name, hidden, token_ids, completion_mask):
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


class LinearTokenLogprobs(nn.Module):
    """:func:`linear_token_logprobs` as a module: ``forward(hidden, weight, token_ids, bias=None, mask=None)``."""

    def __init__(self, *, temperature: float = 1.0, softcap: float | None = None, logit_scale: float = 1.0,
                 return_entropy: bool = False, return_aux: AuxRequest | None = None,
                 options: FusedOptions | None = None):
        super().__init__()
        name = type(self).__name__
        check_temperature(name, temperature)
        check_transform(name, logit_scale, softcap)
        aux_keys(name, return_aux, _LOGPROB_AUX)
        self.temperature, self.softcap, self.logit_scale = temperature, softcap, logit_scale
        self.return_entropy, self.return_aux, self.options = return_entropy, return_aux, options

    def forward(self, hidden, weight, token_ids, bias=None, mask=None):
        return linear_token_logprobs(hidden, weight, token_ids, temperature=self.temperature, softcap=self.softcap,
                                     logit_scale=self.logit_scale, return_entropy=self.return_entropy,
                                     return_aux=self.return_aux, mask=mask, bias=bias, options=self.options)

    def extra_repr(self):
        return (f"temperature={self.temperature}, softcap={self.softcap}, logit_scale={self.logit_scale}, "
                f"return_entropy={self.return_entropy}, return_aux={self.return_aux!r}, options={self.options!r}")
