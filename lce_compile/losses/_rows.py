"""Row math shared by the losses: each function works on one chunk's rows (or on whole per-token tensors)."""
from __future__ import annotations

import functools
import math

import torch

from ..parallel import LOCAL


def check_transform(name, logit_scale, softcap) -> None:
    """The logit transforms, one check for every loss: ``logit_scale`` a positive finite float (a negative one
    would flip the distribution), ``softcap`` a positive finite float or None."""
    if isinstance(logit_scale, bool) or not (isinstance(logit_scale, (int, float)) and math.isfinite(logit_scale)
                                             and logit_scale > 0):
        raise ValueError(f"{name}: logit_scale must be a positive finite float, got {logit_scale!r}.")
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, (int, float))
                                or not 0 < softcap < math.inf):
        raise ValueError(f"{name}: softcap must be a positive finite float or None, got {softcap!r}.")


def widen(logits):
    """fp32 for 16-bit logits; fp32 and fp64 stay as they are."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def log_normalizer(z, vocab=LOCAL):
    """(m, L) per row of fp32 logits ``z`` (C, V): the detached max ``m`` and ``L = log sum exp(z - m) >= 0``, so
    that ``logsumexp(z) = m + L``. Kept apart, as ``log_softmax`` keeps them: on a confident row ``L`` is tiny and
    ``m + L`` would round it to the logits' scale, which is what log-probabilities and entropies are made of."""
    m = vocab.max(z)
    m = torch.where(torch.isfinite(m), m, 0.0)  # rows of -inf: log(0) = -inf, not NaN
    return m, torch.log(vocab.sum(torch.exp(z - m.unsqueeze(-1))))


def target_log_prob(z, targets, vocab=LOCAL):
    """(log softmax(z)[target], logsumexp(z)) per row of fp32 logits ``z`` (C, V); see ``target_log_probs``."""
    logp, m, norm = target_log_probs(z, targets, vocab)
    return logp, m + norm


def target_log_probs(z, targets, vocab=LOCAL):
    """(log softmax(z)[target], m, L) per row: ``(z[target] - m) - L``, with ``m, L = log_normalizer(z)``.

    The target logit is a masked sum rather than a gather: it fuses into the same pass over the vocabulary as
    the normalizer, and its gradient is elementwise (a gather's is a scatter into a (C, V) buffer); on a
    vocabulary shard it is 0 off the shard, so the same sum over ranks picks it.
    Out-of-range targets (unchecked, ``validate=False``, or ignored rows) give NaN, never a plausible number.
    """
    m, norm = log_normalizer(z, vocab)
    in_range = (targets >= 0) & (targets < vocab.size(z))
    return torch.where(in_range, (target_logit(z, targets, vocab) - m) - norm, float("nan")), m, norm


def target_logit(z, targets, vocab=LOCAL):
    """z[target] per row, as a masked sum over the vocabulary (0 for a target off this shard or out of range)."""
    return vocab.sum(torch.where(vocab.columns(z) == targets.unsqueeze(-1), z, 0.0))


def class_weight_at(class_weight, targets):
    """class_weight[target] per row; targets are clamped into range, so an unchecked out-of-range (or ignored)
    target gives some weight instead of failing the gather: its loss is NaN (or masked) already."""
    index = targets.clamp(0, class_weight.shape[0] - 1)
    return class_weight.gather(0, index.reshape(-1)).reshape(targets.shape)


def entropy(z, m, norm, vocab=LOCAL):
    """Entropy of softmax(z) per row, from ``m, norm = log_normalizer(z)``: no (C, V) log-probability tensor.

    ``-sum(p log p) = sum(p (m - z)) + L = exp(-L) sum(exp(z - m) (m - z)) + L``: every term is >= 0, so nothing
    cancels on a confident row (``lse - sum(p z)`` does). The sum depends on the logits and the detached ``m``
    alone, as ``Vocab.sum`` on a shard needs; the gradient flows through ``L``.
    """
    shifted = m.unsqueeze(-1) - z  # >= 0
    return torch.exp(-norm) * vocab.sum(torch.exp(-shifted) * shifted) + norm


def kept_row_weight(targets, ignore_index: int, class_weight=None) -> torch.Tensor:
    """(N,) fp32 weight of each row in a global mean: 0 for ignored rows, else class_weight[target] or 1."""
    kept = targets != ignore_index
    if class_weight is None:
        return kept.float()
    class_weight = class_weight.to(torch.promote_types(class_weight.dtype, torch.float32))
    return class_weight_at(class_weight, targets) * kept


def clipped_surrogate(ratio, advantages, epsilon_low, epsilon_high):
    """PPO/GRPO's per-token loss ``-min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)``."""
    return -torch.minimum(ratio * advantages, ratio.clamp(1 - epsilon_low, 1 + epsilon_high) * advantages)


def clipped_tokens(ratio, advantages, epsilon_low, epsilon_high):
    """Where the clipped term is the active one (TRL's clip ratio): below with A < 0, above with A > 0."""
    return ((ratio < 1 - epsilon_low) & (advantages < 0)) | ((ratio > 1 + epsilon_high) & (advantages > 0))


def k3_kl(ref_logprobs, logprobs):
    """The k3 estimate of KL(policy || reference) per token: ``exp(d) - d - 1`` with ``d = ref - logp``."""
    delta = ref_logprobs - logprobs
    return torch.exp(delta) - delta - 1


def ce_rows(logits, targets, *, class_weight=None, ignore_index=-100, label_smoothing=0.0, logit_scale=1.0,
            softcap=None, z_loss=0.0, z_scale=None, upcast=True, aux_keys=(), vocab=LOCAL):
    """One chunk of cross-entropy: logits (C, V) -> per-row loss (C,) in fp32, plus requested aux. Ignored rows
    give 0.

    F.cross_entropy's per-row loss, written as sums over the vocabulary (so that a vocabulary shard's rows
    compute it too): ``(1 - eps) * w[t] * (lse - z[t]) + eps / V * sum_v w[v] * (lse - z[v])``.
    ``upcast=False`` returns the loss in the logits' dtype (``fused_loss(F.cross_entropy, upcast=False)``),
    computed in fp32 as PyTorch's 16-bit cross-entropy accumulates.
    """
    if not upcast:
        out = ce_rows(logits, targets, class_weight=class_weight, ignore_index=ignore_index,
                      label_smoothing=label_smoothing, logit_scale=logit_scale, softcap=softcap, z_loss=z_loss,
                      z_scale=z_scale, aux_keys=aux_keys, vocab=vocab)
        return out.to(logits.dtype) if not aux_keys else (out[0].to(logits.dtype), out[1])
    z = widen(logits)
    if logit_scale != 1.0:
        z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    kept = targets != ignore_index
    logp, m, norm = target_log_probs(z, targets, vocab)  # NaN where out of range, ignored rows included
    lse = m + norm
    loss = -logp
    if class_weight is not None:  # the full (V,) weights on every rank
        loss = loss * class_weight_at(class_weight.to(z.dtype), targets)
    if label_smoothing:
        # sum_v w_v (lse - z_v) = L sum_v w_v + sum_v w_v (m - z_v): terms >= 0, nothing cancels
        shifted = m.unsqueeze(-1) - z
        if class_weight is None:
            smooth = norm * vocab.size(z) + vocab.sum(shifted)
        else:
            smooth = norm * class_weight.to(z.dtype).sum() + vocab.sum(vocab.local(class_weight).to(z.dtype) * shifted)
        loss = (1 - label_smoothing) * loss + label_smoothing / vocab.size(z) * smooth
    loss = torch.where(kept, loss, 0.0)
    if z_loss:
        # a per-token regulariser: its mean is over kept tokens whatever the class weights (z_scale: the
        # weighted mean's denominator over the count of kept tokens, so that dividing by the former gives it)
        z_term = z_loss * lse.square() * kept
        loss = loss + (z_term if z_scale is None else z_term * z_scale)
    if not aux_keys:
        return loss
    stats = {"loss": loss, "lse": lse}
    if "correct" in aux_keys:
        stats["correct"] = (vocab.argmax(z) == targets) & kept
    return loss, tuple(stats[key].detach() for key in aux_keys)


def log_prob_step(value, scale=1.0, divisor=1.0, entropy=False):
    """The in-place chunk step (``engine``: a row function's ``eager_step``) of rows that read the logits only
    through the target's log-probability (and, with ``entropy``, the row's entropy): ``value(logp, *args,
    **kwargs)`` (``value(logp, entropy, *args, **kwargs)``) with ``logp = log_softmax(z)[target]``,
    ``z = logits * scale / divisor``, the target the first row input.

    PyTorch's log-softmax kernel runs in place of the logits (the CPU kernel reads a row before writing it), as
    the unfused code computes it, and so does the entropy, ``-sum(p * log p)``; the gradient
    ``dvalue/dlogp * (onehot - p) - dvalue/dH * p * (log p + H)`` is then written over the buffer, as the unfused
    backward forms it from the same log-softmax. One (C, V) buffer for fp32 and fp64 logits, two with the entropy
    (a 16-bit chunk adds its fp32 copy).
    """
    return functools.partial(_log_prob_step, value, scale, divisor, entropy)


def _log_prob_step(value_of, scale, divisor, with_entropy, logits, args, kwargs, cotangent, want_bias):
    targets = args[0]
    z = widen(logits)  # the logits themselves in fp32 and fp64
    if scale != 1.0:
        z.mul_(scale)
    if divisor != 1.0:
        z.div_(divisor)
    torch._log_softmax(z, 1, False, out=z)
    in_range = (targets >= 0) & (targets < z.shape[1])
    index = torch.where(in_range, targets, 0).unsqueeze(1)
    logp = torch.where(in_range, z.gather(1, index).squeeze(1), float("nan"))  # unchecked: NaN, as in the rows
    inputs = (logp,)
    if with_entropy:
        inputs += (-z.exp().mul_(z).sum(1),)
    if cotangent is None:
        return value_of(*inputs, *args, **kwargs), (), None

    def objective(*inputs):
        value = value_of(*inputs, *args, **kwargs)
        return (value.to(cotangent.dtype) * cotangent).sum(), value

    grads, (_, value) = torch.func.grad_and_value(objective, argnums=tuple(range(len(inputs))), has_aux=True)(
        *inputs)
    chain = scale / divisor  # d z / d logits
    dlogp = grads[0] if chain == 1.0 else grads[0] * chain
    if with_entropy:
        # as the unfused backward: d/dlog p of the entropy, -dH * p * (log p + 1), and dlogp at the target; then
        # log_softmax's backward, g - p * sum(g)
        dh = grads[1] if chain == 1.0 else grads[1] * chain
        dlog = z.exp()
        dlog.addcmul_(dlog, z).mul_(-dh.to(z.dtype).unsqueeze(1))
        dlog.scatter_add_(1, index, (dlogp * in_range).to(z.dtype).unsqueeze(1))
        torch._log_softmax_backward_data(dlog, z, 1, z.dtype, out=z)
        del dlog
    else:
        z.exp_().mul_(-dlogp.to(z.dtype).unsqueeze(1))  # -dlogp * p
        z.scatter_add_(1, index, (dlogp * in_range).to(z.dtype).unsqueeze(1))  # + dlogp at the target
    return value, (), write_gradient(logits, z, cotangent, want_bias)


def write_gradient(logits, grad, cotangent, want_bias):
    """An in-place step's last move: its gradient ``grad`` (``logits`` itself, or a widened copy) into ``logits``;
    returns the bias gradient, summed from what the matmuls will use (or None)."""
    if grad is not logits:
        logits.copy_(grad)
    return logits.sum(0, dtype=cotangent.dtype) if want_bias else None


def ce_from_log_prob(logp, targets, *, class_weight=None, ignore_index=-100, **_):
    """``ce_rows`` without smoothing or z-loss, from ``logp = log_softmax(z)[target]``."""
    loss = -logp
    if class_weight is not None:
        loss = loss * class_weight_at(class_weight.to(logp.dtype), targets)
    return torch.where(targets != ignore_index, loss, 0.0)


def _ce_eager_step(*, label_smoothing=0.0, logit_scale=1.0, softcap=None, z_loss=0.0, upcast=True, aux_keys=(),
                   vocab=LOCAL, **_):
    if label_smoothing or softcap is not None or z_loss or not upcast or aux_keys or vocab is not LOCAL:
        return None
    return log_prob_step(ce_from_log_prob, scale=logit_scale)


ce_rows.eager_step = _ce_eager_step


def nll_rows(logits, targets, *, class_weight=None, ignore_index=-100, upcast=True, vocab=LOCAL):
    """F.nll_loss's rows (the logits read as log-probabilities), as a sum over a vocabulary that may be split."""
    z = widen(logits)
    in_range = (targets >= 0) & (targets < vocab.size(z))
    loss = torch.where(in_range, -target_logit(z, targets, vocab), float("nan"))  # unchecked: NaN, as in CE
    if class_weight is not None:
        loss = loss * class_weight_at(class_weight.to(z.dtype), targets)
    loss = torch.where(targets != ignore_index, loss, 0.0)
    return loss if upcast else loss.to(logits.dtype)
