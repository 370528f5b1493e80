"""Row math shared by the losses: each function works on one chunk's rows (or on whole per-token tensors)."""
from __future__ import annotations

import torch

from ..parallel import LOCAL


def widen(logits):
    """fp32 for 16-bit logits; fp32 and fp64 stay as they are."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def target_log_prob(z, targets, vocab=LOCAL):
    """(log softmax(z)[target], logsumexp(z)) per row of fp32 logits ``z`` (C, V).

    The target logit is a masked sum rather than a gather: it fuses into the same pass over the vocabulary as
    the logsumexp, and its gradient is elementwise (a gather's is a scatter into a (C, V) buffer); on a
    vocabulary shard it is 0 off the shard, so the same sum over ranks picks it.
    Out-of-range targets (unchecked, ``validate=False``, or ignored rows) give NaN, never a plausible number.
    """
    lse = vocab.logsumexp(z)
    in_range = (targets >= 0) & (targets < vocab.size(z))
    return torch.where(in_range, target_logit(z, targets, vocab) - lse, float("nan")), lse


def target_logit(z, targets, vocab=LOCAL):
    """z[target] per row, as a masked sum over the vocabulary (0 for a target off this shard or out of range)."""
    return vocab.sum(torch.where(vocab.columns(z) == targets.unsqueeze(-1), z, 0.0))


def class_weight_at(class_weight, targets):
    """class_weight[target] per row; targets are clamped into range, so an unchecked out-of-range (or ignored)
    target gives some weight instead of failing the gather: its loss is NaN (or masked) already."""
    index = targets.clamp(0, class_weight.shape[0] - 1)
    return class_weight.gather(0, index.reshape(-1)).reshape(targets.shape)


def entropy(z, lse, vocab=LOCAL):
    """Entropy of softmax(z) per row, ``lse - sum(p z)``: no (C, V) log-probability tensor is formed.

    ``p z`` is summed as ``exp(z - c) z`` with ``c`` the detached ``lse`` (and ``exp(c - lse) = 1`` outside
    carrying its gradient), so that the sum depends on the logits alone, as ``Vocab.sum`` on a shard needs.
    """
    c = lse.detach()
    return lse - vocab.sum(torch.exp(z - c.unsqueeze(-1)) * z) * torch.exp(c - lse)


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
