"""Uncompiled CPU chunks run a row function's own in-place step where it has one: rows that read the logits only
through the target's log-probability (cross-entropy without smoothing or z-loss, token log-probs, and the RL
losses built on them) run PyTorch's log-softmax in place of the logits, in one (C, V) buffer; the forward and
reverse KL in the two heads' buffers and one scratch. The same values and gradients as the generic chunk."""
import pytest
import torch
import torch.nn.functional as F

from lce_compile import (FusedOptions, fused_loss, linear_cross_entropy, linear_grpo_loss, linear_kd_loss,
                         linear_token_logprobs, policy)
from lce_compile.losses import _rows, distillation
from memtrack import AllocationTracker

N, D, V = 45, 16, 97
CHUNK = 8
OPTIONS = FusedOptions(chunk_size=CHUNK)


def _inputs(dtype, seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g, dtype=torch.float64)
    weight = torch.randn(V, D, generator=g, dtype=torch.float64) / D ** 0.5
    b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    targets = torch.randint(0, V, (N,), generator=g)
    targets[::3] = -100
    upstream = torch.randn(N, generator=g, dtype=torch.float64)
    class_weight = torch.rand(V, generator=g, dtype=torch.float64) + 0.5
    return hidden, weight, b, targets, upstream, class_weight


def _ce_ref(logits, targets, class_weight=None, logit_scale=1.0, reduction="mean"):
    return F.cross_entropy(logits * logit_scale, targets, weight=class_weight, reduction=reduction)


def _lp_ref(logits, targets, temperature=1.0, logit_scale=1.0, entropy=False):
    z = ((logits * logit_scale) / temperature).log_softmax(-1)
    logp = z.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logp, -(z.exp() * z).sum(-1)) if entropy else logp


# name -> (fused(h, w, b, t, cw, up), unfused on the logits(logits, t, cw, up), bias?)
CASES = {
    "ce mean": (lambda h, w, b, t, cw, up: linear_cross_entropy(h, w, t, options=OPTIONS),
                lambda z, t, cw, up: _ce_ref(z, t), False),
    "ce class weights, bias, sum": (
        lambda h, w, b, t, cw, up: linear_cross_entropy(h, w, t, bias=b, class_weight=cw.to(h.dtype),
                                                        reduction="sum", options=OPTIONS),
        lambda z, t, cw, up: _ce_ref(z, t, cw, reduction="sum"), True),
    "ce logit_scale, none": (
        lambda h, w, b, t, cw, up: (linear_cross_entropy(h, w, t, logit_scale=0.7, reduction="none",
                                                         options=OPTIONS) * up).sum(),
        lambda z, t, cw, up: (_ce_ref(z, t, logit_scale=0.7, reduction="none") * up).sum(), False),
    "fused_loss(F.cross_entropy)": (
        lambda h, w, b, t, cw, up: fused_loss(F.cross_entropy)(h, w, t, options=OPTIONS),
        lambda z, t, cw, up: _ce_ref(z, t), False),
    "log-probs, temperature, logit_scale": (
        lambda h, w, b, t, cw, up: (linear_token_logprobs(h, w, t.clamp(min=0), bias=b, temperature=0.6,
                                                          logit_scale=1.3, options=OPTIONS) * up).sum(),
        lambda z, t, cw, up: (_lp_ref(z, t, 0.6, 1.3) * up).sum(), True),
    "log-probs and entropy, temperature": (
        lambda h, w, b, t, cw, up: _weigh(linear_token_logprobs(h, w, t.clamp(min=0), temperature=0.6,
                                                                return_entropy=True, options=OPTIONS), up),
        lambda z, t, cw, up: _weigh(_lp_ref(z, t, 0.6, entropy=True), up), False),
}


def _weigh(pair, upstream):
    """Both outputs get a gradient: sum(logp * u + entropy * u^2)."""
    logp, entropy = pair
    return (logp * upstream + entropy * upstream.square()).sum()


def _kd_ref(logits, teacher_logits, targets, kind, temperature=1.0, squared=False):
    s, t = (logits / temperature).log_softmax(-1), (teacher_logits / temperature).log_softmax(-1)
    a, b = (t, s) if kind == "forward_kl" else (s, t)
    rows = (a.exp() * (a - b)).sum(-1) * (temperature ** 2 if squared else 1)
    kept = targets != -100
    return (rows * kept).sum() / kept.sum()


def _teacher(dtype):
    g = torch.Generator().manual_seed(5)
    return (torch.randn(N, 2 * D, generator=g, dtype=torch.float64),
            torch.randn(V, 2 * D, generator=g, dtype=torch.float64) / (2 * D) ** 0.5)


for _kind in ("forward_kl", "reverse_kl"):
    CASES[f"kd {_kind}, temperature, bias"] = (
        lambda h, w, b, t, cw, up, kind=_kind: linear_kd_loss(
            h, w, *(x.to(h.dtype) for x in _teacher(h.dtype)), t, kind=kind, temperature=1.7,
            temperature_squared=True, bias=b, options=OPTIONS),
        lambda z, t, cw, up, kind=_kind: _kd_ref(z, _teacher(z.dtype)[0] @ _teacher(z.dtype)[1].T, t, kind, 1.7,
                                                 True), True)


def _grads(fn, dtype, inputs, use_form, monkeypatch):
    hidden, weight, b, targets, upstream, cw = inputs
    calls = []
    for module, step in ((_rows, "_log_prob_step"), (distillation, "_kl_in_place")):
        real = getattr(module, step)
        monkeypatch.setattr(module, step, lambda *a, real=real: calls.append(1) or real(*a))
    if not use_form:
        monkeypatch.setattr(policy, "in_place_chunks", lambda sched: False)
    leaves = [t if t is None else t.detach().to(dtype).clone().requires_grad_() for t in (hidden, weight, b)]
    value = fn(*leaves, targets, cw, upstream.to(dtype))
    value.backward()
    monkeypatch.undo()
    return [value.detach().double()] + [t.grad.double() for t in leaves if t is not None], len(calls)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_log_prob_form_equals_the_unfused_code(name, dtype, monkeypatch):
    fused, unfused, bias = CASES[name]
    inputs = _inputs(dtype, bias=bias)
    hidden, weight, b, targets, upstream, cw = inputs
    got, calls = _grads(fused, dtype, inputs, True, monkeypatch)
    assert calls > 0, "the log-probability form was not used"
    generic, generic_calls = _grads(fused, dtype, inputs, False, monkeypatch)
    assert generic_calls == 0
    leaves = [t if t is None else t.detach().clone().requires_grad_() for t in (hidden, weight, b)]
    logits = leaves[0] @ leaves[1].T + (0 if b is None else leaves[2])
    want = unfused(logits, targets, cw, upstream)
    want.backward()
    want = [want.detach()] + [t.grad for t in leaves if t is not None]
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-12, rtol=1e-12)
    for i, (g, r, w) in enumerate(zip(got, generic, want)):
        torch.testing.assert_close(g, w, **tol, msg=lambda m: f"output {i} against the unfused code: {m}")
        torch.testing.assert_close(g, r, **tol, msg=lambda m: f"output {i} against the generic chunk: {m}")


@pytest.mark.parametrize("kwargs", [dict(label_smoothing=0.1), dict(z_loss=1e-4), dict(softcap=5.0)],
                         ids=lambda kw: next(iter(kw)))
def test_other_options_run_the_generic_chunk(kwargs, monkeypatch):
    hidden, weight, _, targets, _, _ = _inputs(torch.float32)
    hidden, weight = hidden.float().requires_grad_(), weight.float()
    calls = []
    monkeypatch.setattr(_rows, "_log_prob_step", lambda *a: calls.append(1))
    linear_cross_entropy(hidden, weight, targets, options=OPTIONS, **kwargs).backward()
    linear_token_logprobs(hidden, weight, targets.clamp(min=0), softcap=5.0, options=OPTIONS).sum().backward()
    assert not calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_in_place_log_softmax_equals_the_out_of_place_kernel(dtype):
    """What the in-place steps rely on: the CPU kernels read each contiguous row before writing it."""
    z = torch.randn(37, 5000, dtype=dtype) * 8
    z[3, :100] = float("-inf")
    want = torch.log_softmax(z, 1)
    torch._log_softmax(z, 1, False, out=z)
    assert torch.equal(z, want)
    grad = torch.randn_like(z)
    want = torch._log_softmax_backward_data(grad, z, 1, dtype)
    torch._log_softmax_backward_data(grad, z, 1, dtype, out=z)  # over its output, as the entropy's step does
    assert torch.equal(z, want)


def _peak(loss_fn, n, d, v, others=()):
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(n, d, generator=g, requires_grad=True)
    weight = (torch.randn(v, d, generator=g) / d ** 0.5).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g)
    with AllocationTracker(inputs=(hidden, weight, targets, *others)) as tracker:
        loss_fn(hidden, weight, targets).backward()
    return tracker.peak - hidden.grad.nbytes - weight.grad.nbytes


def test_distillation_holds_three_buffers():
    """The student's and the teacher's (C, V) logits and one scratch buffer (the generic chunk holds ~17)."""
    n, d, v, chunk = 1024, 64, 8192, 64
    g = torch.Generator().manual_seed(3)
    t_hidden, t_weight = torch.randn(n, 2 * d, generator=g), torch.randn(v, 2 * d, generator=g)
    for kind in ("forward_kl", "reverse_kl"):
        above = _peak(lambda h, w, t: linear_kd_loss(h, w, t_hidden, t_weight, t, kind=kind,
                                                     options=FusedOptions(chunk_size=chunk)), n, d, v,
                      others=(t_hidden, t_weight))
        assert above <= 3.25 * chunk * v * 4, f"{kind}: {above / (chunk * v * 4):.2f} (C, V) buffers"


@pytest.mark.parametrize("name", ["cross-entropy", "log-probs", "grpo"])
def test_a_chunk_holds_one_logits_buffer(name):
    n, d, v, chunk = 1024, 64, 8192, 64
    options = FusedOptions(chunk_size=chunk)
    rollout = torch.Generator().manual_seed(2)
    old = -torch.rand(n, generator=rollout) * 5
    adv = torch.randn(n // 64, generator=rollout)
    loss_fn = {
        "cross-entropy": lambda h, w, t: linear_cross_entropy(h, w, t, options=options),
        "log-probs": lambda h, w, t: linear_token_logprobs(h, w, t, options=options).sum(),
        "grpo": lambda h, w, t: linear_grpo_loss(h.view(n // 64, 64, d), w, t.view(n // 64, 64),
                                                 torch.ones(n // 64, 64, dtype=torch.bool), adv,
                                                 old_logprobs=old.view(n // 64, 64), options=options),
    }[name]
    above = _peak(loss_fn, n, d, v)
    buffer = chunk * v * 4
    # one (C, V) buffer, plus O(N) and O(C, D) vectors (grad_hidden's rows, the loss's per-token tensors)
    assert above <= 1.25 * buffer, f"{above / buffer:.2f} (C, V) buffers above the gradients"
