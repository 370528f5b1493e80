"""Unfused references and the accuracy check the project's tests use, for testing a fused loss of one's own.

    from lce_compile.testing import assert_no_less_accurate, forward_backward, make_inputs, unfused_cross_entropy

    hidden, weight, targets = make_inputs(4096, 256, 32003)
    gold = forward_backward(unfused_cross_entropy, hidden, weight, targets, torch.float64)
    ref = forward_backward(unfused_cross_entropy, hidden, weight, targets, torch.bfloat16)
    got = forward_backward(my_fused_loss, hidden, weight, targets, torch.bfloat16)
    assert_no_less_accurate(got, ref, gold)   # loss, grad_hidden, grad_weight

The references are written from the formulas with full logits, independently of the fused engine.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["NOISE", "assert_no_less_accurate", "forward_backward", "make_inputs", "unfused_cross_entropy",
           "unfused_kd"]

# The noise term of the accuracy check, relative to the mean magnitude of the fp64 result: a few fp32 roundings
# (a fused and an unfused computation sum in different orders, so even fp32 against fp32 differs by this).
NOISE = 16 * torch.finfo(torch.float32).eps


def assert_no_less_accurate(got, ref, gold, *, factor=1.1, noise=NOISE, names=("loss", "grad_hidden", "grad_weight")):
    """Each tensor of ``got`` is no further from ``gold`` than ``factor`` times the unfused ``ref``, plus ``noise``.

    ``got``, ``ref``, ``gold``: matching sequences (as :func:`forward_backward` returns them) of the fused result,
    the unfused code's in the same dtype, and an fp64 one. Error: mean absolute difference from ``gold``. The
    bound is ``factor * error(ref) + noise * mean(|gold|)``; ``factor`` may be one number or one per tensor.
    ``got`` and ``ref`` must have the same dtypes.
    """
    factors = tuple(factor) if isinstance(factor, (tuple, list)) else (factor,) * len(gold)
    for name, g, r, o, f in zip(names, gold, ref, got, factors):
        if o.dtype != r.dtype:
            raise AssertionError(f"{name}: dtype {o.dtype}, the unfused code's is {r.dtype}")
        err, ref_err = (o.double() - g).abs().mean(), (r.double() - g).abs().mean()
        if not err <= f * ref_err + noise * g.abs().mean():
            raise AssertionError(f"{name}: error {err:.2e} > {f} x the unfused code's {ref_err:.2e} (+ noise)")


def make_inputs(lead, dim, vocab, dtype=torch.float32, seed=0, ignored=0.1, ignore_index=-100):
    """hidden (*lead, D), weight (V, D), targets (*lead): logit std ~4, a fraction of targets ignored."""
    g = torch.Generator().manual_seed(seed)
    lead = (lead,) if isinstance(lead, int) else tuple(lead)
    hidden = torch.randn(*lead, dim, generator=g)
    weight = torch.randn(vocab, dim, generator=g) * (4.0 / dim ** 0.5)
    targets = torch.randint(0, vocab, lead, generator=g)
    drop = torch.rand(lead, generator=g) < ignored
    targets = torch.where(drop, torch.full_like(targets, ignore_index), targets)
    return hidden.to(dtype), weight.to(dtype), targets


def unfused_cross_entropy(hidden, weight, targets, *, bias=None, class_weight=None, ignore_index=-100,
                          label_smoothing=0.0, logit_scale=1.0, softcap=None, z_loss=0.0, reduction="mean"):
    """The unfused computation, widened to fp32 (fp64 stays fp64)."""
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) * logit_scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    flat, tflat = logits.flatten(0, -2), targets.flatten()
    cw = None if class_weight is None else class_weight.to(flat.dtype)
    loss = F.cross_entropy(flat, tflat, weight=cw, ignore_index=ignore_index,
                           label_smoothing=label_smoothing, reduction="none")
    kept = tflat != ignore_index
    z_term = z_loss * flat.logsumexp(-1).square() * kept if z_loss else torch.zeros_like(loss)
    if reduction == "none":
        return (loss + z_term).view(targets.shape)
    if reduction == "sum":
        return (loss + z_term).sum()
    denom = kept.sum() if cw is None else (cw[tflat.clamp(min=0)] * kept).sum()
    # the z-loss is a per-token regulariser: a mean over kept tokens, whatever the class weights
    return loss.sum() / denom + z_term.sum() / kept.sum()


def forward_backward(loss_fn, hidden, weight, targets, dtype=None, /, *, bias=None, upstream=None, **kw):
    """Forward + backward in ``dtype`` -> (loss, grad_hidden, grad_weight[, grad_bias])."""
    dtype = dtype or hidden.dtype
    h = hidden.detach().to(dtype).requires_grad_()
    w = weight.detach().to(dtype).requires_grad_()
    b = None if bias is None else bias.detach().to(dtype).requires_grad_()
    extra = {} if b is None else {"bias": b}
    loss = loss_fn(h, w, targets, **extra, **kw)
    out = loss if upstream is None else (loss.double() * upstream.double()).sum()
    out.backward()
    grads = (h.grad, w.grad) + (() if b is None else (b.grad,))
    return (loss.detach(), *grads)


def unfused_kd(hidden, weight, teacher_hidden, teacher_weight, targets=None, *, kind="forward_kl",
               beta=0.5, temperature=1.0, temperature_squared=False, ignore_index=-100, hard_weight=0.0,
               reduction="mean", bias=None, teacher_bias=None):
    """Distillation written from the formulas with full logits, in probability space where it can be."""
    wide = torch.promote_types(hidden.dtype, torch.float32)
    s = hidden @ weight.T
    t = (teacher_hidden @ teacher_weight.T).detach()
    if bias is not None:
        s = s + bias
    if teacher_bias is not None:
        t = t + teacher_bias.detach()
    s, t = s.to(wide).flatten(0, -2), t.to(wide).flatten(0, -2)
    p_s, p_t = torch.softmax(s / temperature, -1), torch.softmax(t / temperature, -1)

    def kl(p, q):  # KL(p || q) per row, F.kl_div(log q, p) summed over the vocabulary
        return F.kl_div(q.log(), p, reduction="none").sum(-1)

    if kind == "forward_kl":
        soft = kl(p_t, p_s)
    elif kind == "reverse_kl":
        soft = kl(p_s, p_t)
    else:
        m = beta * p_t + (1 - beta) * p_s
        soft = beta * kl(p_t, m) + (1 - beta) * kl(p_s, m)
    if temperature_squared:
        soft = soft * temperature ** 2
    loss = soft
    kept = torch.ones(s.shape[0], dtype=torch.bool) if targets is None else targets.flatten() != ignore_index
    if hard_weight:
        hard = F.cross_entropy(s, targets.flatten(), ignore_index=ignore_index, reduction="none")
        loss = (1 - hard_weight) * soft + hard_weight * hard
    loss = torch.where(kept.to(loss.device), loss, 0.0)
    if reduction == "none":
        return loss.view(hidden.shape[:-1])
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / kept.sum()
