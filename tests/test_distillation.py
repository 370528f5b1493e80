"""linear_kd_loss against an unfused reference written from the formulas (CPU)."""
import pytest
import torch

from lce_compile import FusedOptions, LinearKDLoss, linear_kd_loss
from memtrack import AllocationTracker
from lce_compile.testing import assert_no_less_accurate, make_inputs, unfused_kd

V = 211  # odd vocabulary


def _inputs(lead, dim=24, teacher_dim=40, dtype=torch.float32, seed=0, ignored=0.1):
    hidden, weight, targets = make_inputs(lead, dim, V, dtype, seed=seed, ignored=ignored)
    t_hidden, t_weight, _ = make_inputs(lead, teacher_dim, V, dtype, seed=seed + 100)
    return hidden, weight, t_hidden, t_weight, targets


def _close(got, gold):
    for g, want in zip(got, gold):  # fp32 against fp64: tolerance on the scale of each tensor
        torch.testing.assert_close(g.double(), want, rtol=1e-4, atol=1e-5 * want.abs().max().item() + 1e-7)


def _run(fn, hidden, weight, t_hidden, t_weight, targets, dtype, upstream=None, bias=None, **kw):
    h = hidden.detach().to(dtype).requires_grad_()
    w = weight.detach().to(dtype).requires_grad_()
    extra = {}
    if bias is not None:
        extra = {"bias": bias[0].detach().to(dtype).requires_grad_(), "teacher_bias": bias[1].to(dtype)}
    loss = fn(h, w, t_hidden.to(dtype), t_weight.to(dtype), targets, **extra, **kw)
    out = loss if upstream is None else (loss.double() * upstream).sum()
    out.backward()
    grads = (h.grad, w.grad) + ((extra["bias"].grad,) if extra else ())
    return (loss.detach(), *grads)


CASES = [
    {"kind": "forward_kl"},
    {"kind": "reverse_kl", "temperature": 2.0},
    {"kind": "jsd", "beta": 0.5},
    {"kind": "jsd", "beta": 0.1, "temperature": 0.7, "temperature_squared": True},
    {"kind": "forward_kl", "temperature": 3.0, "temperature_squared": True, "hard_weight": 0.3},
    {"kind": "reverse_kl", "reduction": "sum"},
    {"kind": "jsd", "beta": 0.9, "reduction": "none"},
]


@pytest.mark.parametrize("kw", CASES, ids=str)
@pytest.mark.parametrize("lead", [(1,), (53,), (3, 37)], ids=str)
def test_matches_unfused_fp64(lead, kw):
    hidden, weight, t_hidden, t_weight, targets = _inputs(lead, seed=len(lead))
    upstream = torch.randn(lead, dtype=torch.float64) if kw.get("reduction") == "none" else None
    bias = (torch.randn(V) * 0.1, torch.randn(V) * 0.1)
    gold = _run(unfused_kd, hidden, weight, t_hidden, t_weight, targets, torch.float64, upstream, bias, **kw)
    opts = FusedOptions(chunk_size=16)
    got = _run(linear_kd_loss, hidden, weight, t_hidden, t_weight, targets, torch.float32, upstream, bias,
               options=opts, **kw)
    _close(got, gold)


@pytest.mark.parametrize("kind", ["forward_kl", "jsd"])
def test_without_targets_every_token_counts(kind):
    hidden, weight, t_hidden, t_weight, _ = _inputs(45, seed=3)
    gold = _run(unfused_kd, hidden, weight, t_hidden, t_weight, None, torch.float64, kind=kind)
    got = _run(linear_kd_loss, hidden, weight, t_hidden, t_weight, None, torch.float32, kind=kind,
               options=FusedOptions(chunk_size=8))
    _close(got, gold)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_bf16_no_less_accurate_than_unfused(kind):
    hidden, weight, t_hidden, t_weight, targets = _inputs(300, dim=64, teacher_dim=96, seed=4)
    gold = _run(unfused_kd, hidden, weight, t_hidden, t_weight, targets, torch.float64, kind=kind)
    ref = _run(unfused_kd, hidden, weight, t_hidden, t_weight, targets, torch.bfloat16, kind=kind)
    got = _run(linear_kd_loss, hidden, weight, t_hidden, t_weight, targets, torch.bfloat16, kind=kind,
               options=FusedOptions(chunk_size=64))
    assert_no_less_accurate(got, ref, gold, )


def test_all_ignored_gives_nan_mean_and_zero_gradients():
    hidden, weight, t_hidden, t_weight, targets = _inputs(20, seed=5, ignored=1.0)
    loss, grad_h, grad_w = _run(linear_kd_loss, hidden, weight, t_hidden, t_weight, targets, torch.float32,
                                options=FusedOptions(chunk_size=8))
    gold = unfused_kd(hidden, weight, t_hidden, t_weight, targets)
    assert loss.isnan() and gold.isnan()
    assert not grad_h.any() and not grad_w.any()


def test_teacher_gets_no_gradient_and_module_form():
    hidden, weight, t_hidden, t_weight, targets = _inputs((2, 9), seed=6)
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    th, tw = t_hidden.requires_grad_(), t_weight.requires_grad_()
    module = LinearKDLoss(kind="jsd", beta=0.3, temperature=1.5, hard_weight=0.2)
    loss = module(h, w, th, tw, targets)
    loss.backward()
    assert th.grad is None and tw.grad is None
    gold = unfused_kd(hidden.double(), weight.double(), t_hidden.double(), t_weight.double(), targets, kind="jsd",
                      beta=0.3, temperature=1.5, hard_weight=0.2)
    torch.testing.assert_close(loss.double(), gold, rtol=1e-5, atol=1e-7)
    assert "kind='jsd'" in repr(module)


def test_no_n_by_v_tensor_for_student_or_teacher():
    n, chunk, vocab = 2048, 32, 4096
    hidden, weight, targets = make_inputs(n, 32, vocab, seed=7)
    t_hidden, t_weight, _ = make_inputs(n, 48, vocab, seed=8)
    hidden.requires_grad_(), weight.requires_grad_()
    opts = FusedOptions(chunk_size=chunk, compile=False)
    with AllocationTracker(inputs=(hidden, weight, targets, t_hidden, t_weight)) as tracker:
        linear_kd_loss(hidden, weight, t_hidden, t_weight, targets, kind="jsd", hard_weight=0.5,
                       options=opts).backward()
    grads = hidden.grad.nbytes + weight.grad.nbytes
    assert tracker.largest < n * vocab // 10, f"a tensor of {tracker.largest} elements was allocated"
    # eager chunks hold ~17 fp32 (C, V) buffers across both heads (JSD: log-probabilities, the mixture, their
    # gradients); compiled chunks fuse them away. The full logits would be 64 such buffers.
    assert tracker.peak <= grads + 20 * chunk * vocab * 4, f"peak {tracker.peak / 1e6:.1f} MB"


def test_chunks_share_the_budget_between_heads():
    from lce_compile import policy
    weight = torch.empty(1000, 64, device="meta")
    # a meta weight is not on the CPU: it takes the memory-budget rule of CUDA and MPS
    one = policy.chunk_rows(weight, FusedOptions())
    two = policy.chunk_rows(weight, FusedOptions(), buffers=2)
    assert two * 2 <= one <= two * 2 + 16


@pytest.mark.parametrize("beta", [0.5, 0.2, 0.9])
def test_jsd_mixture_from_probabilities(monkeypatch, beta):
    """The JSD's CUDA form (log m from the probabilities, chosen where the compiled step recomputes shared
    values), run here on the CPU: fp32 against fp64, and bf16 no less accurate than the unfused code."""
    from lce_compile import policy
    monkeypatch.setattr(policy, "recomputes_shared_values", lambda device: True)
    hidden, weight, t_hidden, t_weight, targets = _inputs(300, dim=64, teacher_dim=96, seed=6)
    kw = dict(kind="jsd", beta=beta)
    opts = FusedOptions(chunk_size=64)
    gold = _run(unfused_kd, hidden, weight, t_hidden, t_weight, targets, torch.float64, **kw)
    _close(_run(linear_kd_loss, hidden, weight, t_hidden, t_weight, targets, torch.float32, options=opts, **kw), gold)
    ref = _run(unfused_kd, hidden, weight, t_hidden, t_weight, targets, torch.bfloat16, **kw)
    got = _run(linear_kd_loss, hidden, weight, t_hidden, t_weight, targets, torch.bfloat16, options=opts, **kw)
    assert_no_less_accurate(got, ref, gold, )


def test_old_student_keywords_still_work_with_a_warning():
    hidden, weight, t_hidden, t_weight, targets = _inputs(20, seed=9)
    want = linear_kd_loss(hidden, weight, t_hidden, t_weight, targets)
    with pytest.warns(DeprecationWarning, match="student_hidden= is now hidden="):
        got = linear_kd_loss(student_hidden=hidden, student_weight=weight, teacher_hidden=t_hidden,
                             teacher_weight=t_weight, targets=targets)
    torch.testing.assert_close(got, want)
    with pytest.raises(TypeError, match="got both bias= and its old name student_bias="):
        linear_kd_loss(hidden, weight, t_hidden, t_weight, bias=torch.zeros(V), student_bias=torch.zeros(V))
