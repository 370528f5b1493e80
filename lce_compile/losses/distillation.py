"""Fused knowledge distillation: forward KL, reverse KL and generalized JSD, with the teacher's head fused too."""
from __future__ import annotations

import functools
import math
import warnings

import torch
from torch import nn

from .. import checks, policy
from ._rows import LOCAL
from ..policy import FusedOptions
from ..wrap import fused_call
from ._rows import target_log_prob, widen, write_gradient

_NAME = "linear_kd_loss"
KINDS = ("forward_kl", "reverse_kl", "jsd")


_LOG2E = 1 / math.log(2)


class _SoftLoss(torch.autograd.Function):
    """Per-row forward KL, reverse KL or JSD of tempered student logits ``s`` against teacher logits ``t``
    (C, V), with a hand-written gradient for ``s``.

    Its forms keep a compiled chunk at one (C, V) buffer beside the teacher's: docs/design.md, "Distillation
    rows", says which and why.
    """

    @staticmethod
    def forward(s, t, kind, beta, vocab):
        # the sums over the vocabulary are vocab's (all-reduced on a shard); the backward below is local given
        # the rows' log-sum-exps and divergences, so they need no gradient
        if kind == "jsd":
            lse_s, lse_t = vocab.logsumexp(s).unsqueeze(-1), vocab.logsumexp(t).unsqueeze(-1)
            log_s, log_t = s - lse_s, t - lse_t
            if policy.recomputes_shared_values(s.device):
                # fewer transcendentals (measured 1.08x compile's time on an H200 against 1.15x for the forms
                # below); where p = 0 the term is 0 (m may be 0 there too)
                p_s, p_t = log_s.exp(), log_t.exp()
                log_m = torch.log(beta * p_t + (1 - beta) * p_s)
                row = vocab.sum(torch.where(p_s > 0, p_s * (log_s - log_m), 0.0))
                to_teacher = vocab.sum(torch.where(p_t > 0, p_t * (log_t - log_m), 0.0))
                return beta * to_teacher + (1 - beta) * row, lse_s, lse_t, row
            row = vocab.sum(log_s.exp() * (log_s - _log_mixture(log_s, log_t, beta, form=0)))  # KL(p_s || m)
            to_teacher = vocab.sum(log_t.exp() * (log_t - _log_mixture(log_s, log_t, beta, form=1)))  # KL(p_t || m)
            value = beta * to_teacher + (1 - beta) * row
            return value, lse_s, lse_t, row
        a, b = (t, s) if kind == "forward_kl" else (s, t)  # KL(p_a || p_b)
        lse_a, lse_b = vocab.logsumexp(a).unsqueeze(-1), vocab.logsumexp(b).unsqueeze(-1)
        max_a = vocab.max(a).unsqueeze(-1)
        # E_p[a - b] = sum(exp(a - max a) (a - b)) / sum(exp(a - max a)); exp2, not the logsumexp's exp, which
        # Inductor would store to share between the two sums
        weighted = vocab.sum(torch.exp2((a - max_a) * _LOG2E) * (a - b)).unsqueeze(-1)
        value = (weighted * torch.exp(max_a - lse_a) - lse_a + lse_b).squeeze(-1)
        lse_s, lse_t = (lse_b, lse_a) if kind == "forward_kl" else (lse_a, lse_b)
        return value, lse_s, lse_t, value.clone()  # a distinct output (torch.compile cannot return one twice)

    @staticmethod
    def setup_context(ctx, inputs, output):
        s, t, kind, beta, _ = inputs
        _, lse_s, lse_t, row = output
        ctx.kind, ctx.beta = kind, beta
        ctx.mark_non_differentiable(lse_s, lse_t, row)
        ctx.save_for_backward(s, t, lse_s, lse_t, row)

    @staticmethod
    def backward(ctx, grad, *_):
        s, t, lse_s, lse_t, row = ctx.saved_tensors
        log_s, log_t = s - lse_s, t - lse_t
        p_s = torch.exp2(log_s * _LOG2E)  # exp2: not merged with (and then stored from) the forward's exp
        if ctx.kind == "forward_kl":    # d/ds KL(p_t || p_s) = p_s - p_t
            grad_s = p_s - torch.exp2(log_t * _LOG2E)
        elif ctx.kind == "reverse_kl":  # p_s * (log p_s - log p_t - KL(p_s || p_t))
            grad_s = p_s * (log_s - log_t - row.unsqueeze(-1))
        else:                           # (1 - beta) * p_s * (log p_s - log m - KL(p_s || m))
            if policy.recomputes_shared_values(s.device):
                log_m = torch.log(ctx.beta * torch.exp2(log_t * _LOG2E) + (1 - ctx.beta) * p_s)
            else:
                log_m = _log_mixture(log_s, log_t, ctx.beta, form=2)
            grad_s = (1 - ctx.beta) * p_s * (log_s - log_m - row.unsqueeze(-1))
        return grad.unsqueeze(-1) * grad_s, None, None, None, None


def _log_mixture(log_s, log_t, beta, form):
    """log(beta * p_t + (1 - beta) * p_s), written in one of three equal forms (see _SoftLoss)."""
    log_beta = math.log(beta) if beta > 0 else -math.inf
    log_rest = math.log1p(-beta) if beta < 1 else -math.inf
    a, b = log_t + log_beta, log_s + log_rest
    if form == 0:
        return torch.logaddexp(a, b)
    high = torch.maximum(a, b)
    if form == 1:
        return high + torch.log1p(torch.exp(-(a - b).abs()))
    return high + torch.log1p(torch.exp2(-(a - b).abs() * _LOG2E))


def _kd_rows(logits, teacher_logits, targets=None, *, kind="forward_kl", beta=0.5, temperature=1.0,
             temperature_squared=False, ignore_index=-100, hard_weight=0.0, vocab=LOCAL):
    """One chunk: student and teacher logits (C, V) -> per-row loss (C,) in fp32; ignored rows give 0."""
    student = widen(logits)
    soft = _SoftLoss.apply(student / temperature, widen(teacher_logits) / temperature, kind, beta, vocab)[0]
    if temperature_squared:
        soft = soft * temperature ** 2
    loss = soft
    if hard_weight:
        hard = -target_log_prob(student, targets, vocab)[0]
        loss = (1 - hard_weight) * soft + hard_weight * hard
    if targets is None:
        return loss
    return torch.where(targets != ignore_index, loss, 0.0)


def _kd_eager_step(*, kind="forward_kl", temperature=1.0, temperature_squared=False, ignore_index=-100,
                   hard_weight=0.0, vocab=LOCAL, **_):
    if kind == "jsd" or hard_weight or vocab is not LOCAL:
        return None
    return functools.partial(_kl_in_place, kind == "forward_kl", temperature, temperature_squared, ignore_index)


def _kl_in_place(forward, temperature, squared, ignore_index, logits, args, kwargs, cotangent, want_bias):
    """``_kd_rows``' in-place chunk step (``engine``: ``eager_step``) for the forward and reverse KL: both heads'
    log-softmax by PyTorch's kernel in place, then one (C, V) scratch buffer. The forward KL's gradient is
    ``p_s - p_t``, the reverse's ``p_s (log p_s - log p_t - KL)`` (per tempered student logit), as in _SoftLoss."""
    teacher, targets = args[0], (args[1] if len(args) > 1 else None)
    s = widen(logits)  # the logits themselves in fp32 and fp64
    t = teacher.to(s.dtype)  # ours to overwrite: the frozen head's chunk logits
    if temperature != 1.0:
        s.div_(temperature)
        t.div_(temperature)
    torch._log_softmax(s, 1, False, out=s)
    torch._log_softmax(t, 1, False, out=t)
    if forward:  # KL(p_t || p_s) = sum p_t (log p_t - log p_s)
        scratch = torch.sub(t, s)
        t.exp_()
        value = scratch.mul_(t).sum(1)
        del scratch
        grad = s.exp_().sub_(t) if cotangent is not None else None
    else:  # KL(p_s || p_t) = sum p_s (log p_s - log p_t)
        diff = torch.sub(s, t)
        s.exp_()
        value = torch.mul(s, diff, out=t).sum(1)
        grad = s.mul_(diff.sub_(value.unsqueeze(1))) if cotangent is not None else None
        del diff
    if squared:
        value = value * temperature ** 2
    kept = None if targets is None else targets != ignore_index
    if kept is not None:
        value = torch.where(kept, value, 0.0)
    if cotangent is None:
        return value, (), None
    factor = cotangent.to(s.dtype).expand(value.shape) / temperature
    if squared:
        factor = factor * temperature ** 2
    if kept is not None:
        factor = torch.where(kept, factor, 0.0)
    grad.mul_(factor.unsqueeze(1))
    return value, (), write_gradient(logits, grad, cotangent, want_bias)


_kd_rows.eager_step = _kd_eager_step


def linear_kd_loss(hidden=None, weight=None, teacher_hidden=None, teacher_weight=None, targets=None, *,
                   kind: str = "forward_kl", beta: float = 0.5, temperature: float = 1.0,
                   temperature_squared: bool = False, ignore_index: int = -100, hard_weight: float = 0.0,
                   reduction: str = "mean", bias=None, teacher_bias=None,
                   options: FusedOptions | None = None, **deprecated):
    r"""Distillation loss between a student's and a teacher's output layers, without either's logits.

    Same value and gradients, up to float rounding, as the unfused code::

        s = (hidden @ weight.T + bias).float()                            # (..., V), the student; bias if given
        t = (teacher_hidden @ teacher_weight.T + teacher_bias).float()    # (..., V), no gradient
        log_s = F.log_softmax(s / temperature, -1)
        log_t = F.log_softmax(t / temperature, -1)
        kl = lambda log_p, log_q: (log_p.exp() * (log_p - log_q)).sum(-1)   # KL(p || q) per token
        if kind == "forward_kl":
            soft = kl(log_t, log_s)                                  # KL(p_t || p_s)
        elif kind == "reverse_kl":
            soft = kl(log_s, log_t)                                  # KL(p_s || p_t)
        else:  # "jsd", m = beta p_t + (1 - beta) p_s
            log_m = torch.log(beta * log_t.exp() + (1 - beta) * log_s.exp())
            soft = beta * kl(log_t, log_m) + (1 - beta) * kl(log_s, log_m)
        if temperature_squared:
            soft = soft * temperature ** 2
        loss = soft
        if hard_weight:                                              # the cross-entropy at temperature 1
            hard = F.cross_entropy(s.flatten(0, -2), targets.flatten(), reduction="none").view(targets.shape)
            loss = (1 - hard_weight) * soft + hard_weight * hard
        if targets is not None:                                      # per token; 0 where ignored
            loss = torch.where(targets != ignore_index, loss, 0.0)
        # "mean": loss.sum() / (targets != ignore_index).sum()  (over all tokens when targets is None),
        # "sum": loss.sum(), "none": loss.view(hidden.shape[:-1])

    The JSD is the generalized one: ``beta = 0.5`` is the symmetric Jensen-Shannon divergence; at
    ``beta = 0`` or ``1`` the mixture equals one of the two distributions and the loss is 0.

    Only the student gets gradients. The teacher's logits are computed chunk by chunk like the student's,
    under no gradient, and its inputs are never differentiated (no gradient work for the teacher).

    Args:
        hidden (Tensor): ``(..., D)`` the student's final hidden states (the trained head, as in every loss).
        weight (Tensor): ``(V, D)`` the student's output layer; or split over the vocabulary across ranks (a
            ``Shard(0)`` DTensor beside a DTensor ``hidden``, or a ``VocabShard``: docs/distributed.md).
        teacher_hidden (Tensor): ``(..., D_t)`` the teacher's, for the same tokens; ``D_t`` may differ from ``D``.
        teacher_weight (Tensor): ``(V, D_t)`` the teacher's output layer, over the same vocabulary, split as
            ``weight`` is.
        targets (Tensor, optional): ``(...)`` token ids: tokens equal to ``ignore_index`` contribute 0 and leave
            the mean; needed for ``hard_weight > 0``. Default: every token counts.
        kind (str): ``"forward_kl"`` | ``"reverse_kl"`` | ``"jsd"``. Default: ``"forward_kl"``.
        beta (float): the JSD's teacher weight in the mixture, in ``[0, 1]``. Default: 0.5.
        temperature (float): divides both logits of the soft loss. Default: 1.
        temperature_squared (bool): multiply the soft loss by ``temperature ** 2`` (Hinton et al.), which keeps
            its gradients' scale independent of the temperature. Default: ``False``.
        ignore_index (int): as above. Default: -100.
        hard_weight (float): weight in ``[0, 1]`` of the cross-entropy on ``targets`` (the soft loss gets
            ``1 - hard_weight``). Default: 0.
        reduction (str): ``"mean"`` | ``"sum"`` | ``"none"``. Default: ``"mean"``.
        bias, teacher_bias (Tensor, optional): ``(V,)`` the student's and the teacher's output-layer biases.
        student_hidden, student_weight, student_bias: the old keyword names of ``hidden``, ``weight``,
            ``bias``; accepted with a ``DeprecationWarning``, removed in 0.2.0.
        options (FusedOptions, optional): engine knobs; the chunk budget is shared by the two heads' logits.
    Returns:
        Tensor: an fp32 scalar, or the per-token losses in the tokens' shape for ``"none"``.
    Memory: the student's gradients plus one ``(C, V)`` chunk of each head's logits; never ``(N, V)``.
    """
    hidden, weight, bias = _renamed(hidden, weight, bias, deprecated)
    _check_options(kind, beta, temperature, hard_weight, targets)
    static = {"kind": kind, "beta": float(beta), "temperature": float(temperature),
              "temperature_squared": temperature_squared, "ignore_index": ignore_index,
              "hard_weight": float(hard_weight)}
    # without targets every token counts: the mean's weights are then one per row (the engine's default)
    return fused_call(_NAME, _kd_rows, hidden, weight, bias, teacher=(teacher_hidden, teacher_weight, teacher_bias),
                      targets=targets, ignore_index=ignore_index, static=static, reduction=reduction, options=options)


_OLD_NAMES = {"student_hidden": "hidden", "student_weight": "weight", "student_bias": "bias"}


def _renamed(hidden, weight, bias, deprecated):
    """The student's head under its old keyword names (``student_*``), with a warning; anything else raises."""
    new = {"hidden": hidden, "weight": weight, "bias": bias}
    for old, value in deprecated.items():
        if old not in _OLD_NAMES:
            raise TypeError(f"{_NAME}() got an unexpected keyword argument {old!r}")
        name = _OLD_NAMES[old]
        if new[name] is not None:
            raise TypeError(f"{_NAME}: got both {name}= and its old name {old}=; pass {name}= only.")
        warnings.warn(f"{_NAME}: {old}= is now {name}= (the trained head is hidden, weight, bias in every loss); "
                      f"the old name is removed in 0.2.0.", DeprecationWarning, stacklevel=3)
        new[name] = value
    if new["hidden"] is None or new["weight"] is None:
        raise TypeError(f"{_NAME}: missing the student's hidden and weight; call it as "
                        f"(hidden, weight, teacher_hidden, teacher_weight, targets=None, ...).")
    return new["hidden"], new["weight"], new["bias"]


def _check_options(kind, beta, temperature, hard_weight, targets):
    if kind not in KINDS:
        raise ValueError(f"{_NAME}: kind must be one of {', '.join(map(repr, KINDS))}, got {kind!r}.")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"{_NAME}: beta must be in [0, 1], got {beta!r}.")
    if not temperature > 0:
        raise ValueError(f"{_NAME}: temperature must be > 0, got {temperature!r}.")
    if not 0.0 <= hard_weight <= 1.0:
        raise ValueError(f"{_NAME}: hard_weight must be in [0, 1], got {hard_weight!r}.")
    if hard_weight and targets is None:
        raise ValueError(f"{_NAME}: hard_weight={hard_weight} needs targets for its cross-entropy, got None.")


class LinearKDLoss(nn.Module):
    """:func:`linear_kd_loss` as a module; ``forward(hidden, weight, teacher_hidden, teacher_weight, targets=None,
    bias=None, teacher_bias=None)``. Every keyword option is set here."""

    def __init__(self, *, kind: str = "forward_kl", beta: float = 0.5, temperature: float = 1.0,
                 temperature_squared: bool = False, ignore_index: int = -100, hard_weight: float = 0.0,
                 reduction: str = "mean", options: FusedOptions | None = None):
        super().__init__()
        checks.check_reduction(type(self).__name__, reduction)
        _check_options(kind, beta, temperature, hard_weight, targets=0)
        self.kind, self.beta, self.temperature, self.temperature_squared = kind, beta, temperature, temperature_squared
        self.ignore_index, self.hard_weight, self.reduction, self.options = ignore_index, hard_weight, reduction, options

    def forward(self, hidden, weight, teacher_hidden, teacher_weight, targets=None, bias=None, teacher_bias=None):
        return linear_kd_loss(
            hidden, weight, teacher_hidden, teacher_weight, targets, kind=self.kind,
            beta=self.beta, temperature=self.temperature, temperature_squared=self.temperature_squared,
            ignore_index=self.ignore_index, hard_weight=self.hard_weight, reduction=self.reduction,
            bias=bias, teacher_bias=teacher_bias, options=self.options)

    def extra_repr(self):
        return (f"kind={self.kind!r}, beta={self.beta}, temperature={self.temperature}, "
                f"temperature_squared={self.temperature_squared}, hard_weight={self.hard_weight}, "
                f"reduction={self.reduction!r}")
