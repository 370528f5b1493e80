"""The setups training runs use: autocast, activation checkpointing and offloading, a second backward,
gradcheck, unsupported transforms refused, any integer target dtype. Each against the unfused code under the
same setup."""
import functools

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lce_compile import (FusedOptions, fused_loss, linear_cross_entropy, linear_dpo_loss, linear_grpo_loss,
                         linear_kd_loss, linear_token_logprobs)
from lce_compile.testing import assert_no_less_accurate, make_inputs, unfused_cross_entropy, unfused_kd

OPTS = FusedOptions(chunk_size=32)
V, D = 67, 16
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _teacher(n, seed=50):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 24, generator=g), torch.randn(V, 24, generator=g) * 0.8


def _grpo_rows(n):
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, V, (2, n // 2), generator=g)
    mask = torch.rand(2, n // 2, generator=g) < 0.8
    adv = torch.randn(2, generator=g)
    ref = torch.randn(2, n // 2, generator=g) - 4
    return ids, mask, adv, ref


def _unfused_grpo(h, w, ids, mask, adv, ref, beta=0.04):
    logp = (h @ w.T).float().log_softmax(-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    ratio = torch.exp(logp - logp.detach())
    loss = -torch.minimum(ratio * adv[:, None], ratio.clamp(0.8, 1.2) * adv[:, None])
    d = ref - logp
    loss = loss + beta * (d.exp() - d - 1)
    return ((loss * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()


def _losses(n, device="cpu"):
    """name -> (fused fn(h, w, t), unfused fn(h, w, t)): every loss family, scalar outputs."""
    th, tw = (t.to(device) for t in _teacher(n))
    ids, mask, adv, ref = (t.to(device) for t in _grpo_rows(n))
    grpo = functools.partial(linear_grpo_loss, token_ids=ids, completion_mask=mask, advantages=adv, ref_logprobs=ref,
                             beta=0.04, loss_type="grpo", options=OPTS)
    return {
        "ce_mean": (lambda h, w, t: linear_cross_entropy(h, w, t, options=OPTS),
                    lambda h, w, t: unfused_cross_entropy(h, w, t)),
        "ce_sum": (lambda h, w, t: linear_cross_entropy(h, w, t, reduction="sum", options=OPTS),
                   lambda h, w, t: unfused_cross_entropy(h, w, t, reduction="sum")),
        "ce_none": (lambda h, w, t: (linear_cross_entropy(h, w, t, reduction="none", options=OPTS) ** 2).sum(),
                    lambda h, w, t: (unfused_cross_entropy(h, w, t, reduction="none") ** 2).sum()),
        "fused_loss_ce": (lambda h, w, t: fused_loss(F.cross_entropy, options=OPTS)(h, w, t),
                          lambda h, w, t: F.cross_entropy((h @ w.T).float(), t)),
        "kd": (lambda h, w, t: linear_kd_loss(h, w, th.to(h.dtype), tw.to(h.dtype), t, options=OPTS),
               lambda h, w, t: unfused_kd(h, w, th.to(h.dtype), tw.to(h.dtype), t)),
        "grpo": (lambda h, w, t: grpo(h.view(2, n // 2, -1), w),
                 lambda h, w, t: _unfused_grpo(h.view(2, n // 2, -1), w, ids, mask, adv, ref)),
    }


def _step(fn, hidden, weight, targets, wrap=None):
    h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    loss = wrap(fn, h, w, targets) if wrap else fn(h, w, targets)
    loss.backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(_losses(64)))
@pytest.mark.parametrize("hidden_dtype", [torch.float32, torch.bfloat16], ids=["fp32_hidden", "bf16_hidden"])
def test_autocast_bf16_with_fp32_weight(name, hidden_dtype, device):
    """Under torch.autocast (bf16) with an fp32 weight: the unfused code's value and gradients (its matmul in
    bf16, the loss in fp32), gradients in the inputs' dtypes, no less accurate than it against fp64."""
    hidden, weight, targets = (t.to(device) for t in make_inputs(64, D, V, seed=3))
    fused, unfused = _losses(64, device)[name]
    gold = _step(unfused, hidden.double(), weight.double(), targets)

    def under_autocast(fn, h, w, t):
        with torch.autocast(device, dtype=torch.bfloat16):
            return fn(h, w, t)
    hidden = hidden.to(hidden_dtype)
    ref = _step(unfused, hidden, weight, targets, under_autocast)
    got = _step(fused, hidden, weight, targets, under_autocast)
    assert got[0].dtype == ref[0].dtype == torch.float32
    assert (got[1].dtype, got[2].dtype) == (hidden_dtype, torch.float32)
    assert_no_less_accurate(got, ref, gold, factor=1.25)


def _save_on_cpu(fn, h, w, t):
    with torch.autograd.graph.save_on_cpu():
        return fn(h, w, t)


def _checkpointed(fn, h, w, t):
    return checkpoint(fn, h, w, t, use_reentrant=False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("wrap", [_checkpointed, _save_on_cpu], ids=["checkpoint", "save_on_cpu"])
@pytest.mark.parametrize("name", list(_losses(64)))
def test_saved_tensor_hooks(name, wrap, device):
    """Activation checkpointing (non-reentrant) and offloading around the loss: the unfused code's value and
    gradients under the same wrapper."""
    hidden, weight, targets = (t.to(device) for t in make_inputs(64, D, V, seed=4))
    fused, unfused = _losses(64, device)[name]
    ref = _step(unfused, hidden, weight, targets, wrap)
    got = _step(fused, hidden, weight, targets, wrap)
    for r, o in zip(ref, got):
        torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(_losses(64)))
def test_second_backward_through_a_retained_graph(name, device):
    hidden, weight, targets = (t.to(device) for t in make_inputs(64, D, V, seed=5))
    fused, _ = _losses(64, device)[name]
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = fused(h, w, targets)
    loss.backward(retain_graph=True)
    first = h.grad.clone(), w.grad.clone()
    loss.backward(retain_graph=True)
    loss.backward()
    torch.testing.assert_close(h.grad, 3 * first[0])
    torch.testing.assert_close(w.grad, 3 * first[1])


def _gradcheck_cases():
    n = 12
    g = torch.Generator().manual_seed(11)
    targets = torch.randint(0, 9, (n,), generator=g)
    targets[3] = -100
    th, tw = torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randn(9, 5, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 9, (2, n // 2), generator=g)
    mask = torch.rand(2, n // 2, generator=g) < 0.8
    adv, ref = torch.randn(2, generator=g, dtype=torch.float64), torch.randn(2, n // 2, generator=g, dtype=torch.float64)
    o = FusedOptions(chunk_size=5)
    cases = {f"ce_{r}": lambda h, w, b, r=r: linear_cross_entropy(h, w, targets, bias=b, reduction=r, options=o)
             for r in ("mean", "sum", "none")}
    cases["ce_smoothing_softcap_zloss"] = lambda h, w, b: linear_cross_entropy(
        h, w, targets, bias=b, label_smoothing=0.1, softcap=3.0, z_loss=1e-2, options=o)
    cases["fused_loss_ce"] = lambda h, w, b: fused_loss(F.cross_entropy, options=o)(h, w, targets, bias=b)
    cases["fused_loss_rows"] = lambda h, w, b: fused_loss(
        lambda z, t: z.logsumexp(-1) - z.gather(-1, t[:, None].clamp(min=0)).squeeze(-1), options=o)(
        h, w, targets, bias=b)
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        for r in ("mean", "none"):
            cases[f"kd_{kind}_{r}"] = lambda h, w, b, k=kind, r=r: linear_kd_loss(
                h, w, th, tw, targets, kind=k, reduction=r, bias=b, options=o)
    cases["logprobs_entropy"] = lambda h, w, b: linear_token_logprobs(h, w, ids.view(-1), bias=b,
                                                                      return_entropy=True, options=o)
    old = torch.randn(2, n // 2, generator=g, dtype=torch.float64) - 2  # without it the ratio is a stop-gradient
    for level in ("token", "sequence"):
        cases[f"grpo_{level}"] = lambda h, w, b, lv=level: linear_grpo_loss(
            h.view(2, n // 2, -1), w, ids, mask, adv, old_logprobs=old, ref_logprobs=ref, importance_sampling_level=lv,
            epsilon_low=10.0, epsilon_high=10.0, bias=b, options=o)  # no clipping: smooth at the test point
    cases["dpo"] = lambda h, w, b: linear_dpo_loss(h.view(2, n // 2, -1), w, ids, mask, ref.sum(-1), bias=b,
                                                   options=o)
    return cases


@pytest.mark.parametrize("name", list(_gradcheck_cases()))
def test_gradcheck_fp64(name):
    fn = _gradcheck_cases()[name]
    g = torch.Generator().manual_seed(12)
    h = torch.randn(12, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, 4, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(9, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fn, (h, w, b), fast_mode=True)


def test_double_backward_and_torch_func_refused():
    hidden, weight, targets = make_inputs(20, 8, 13, seed=6)
    for reduction in ("mean", "none"):
        h = hidden.clone().requires_grad_()
        loss = linear_cross_entropy(h, weight, targets, reduction=reduction, options=OPTS).sum()
        with pytest.raises(NotImplementedError, match="double backward"):
            torch.autograd.grad(loss, h, create_graph=True)
    with pytest.raises(NotImplementedError, match="torch.func"):
        torch.func.grad(lambda h: linear_cross_entropy(h, weight, targets, options=OPTS))(hidden)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32], ids=str)
def test_any_integer_target_dtype(dtype):
    """Targets are class indices whatever their integer dtype: uint8's 156 is a class, not -100 wrapped."""
    hidden, weight, _ = make_inputs(40, 8, 200, seed=7)
    targets = torch.randint(0, 120, (40,), generator=torch.Generator().manual_seed(1))
    targets[:5] = 156 if dtype == torch.uint8 else -100
    gold = unfused_cross_entropy(hidden.double(), weight.double(), targets.long())
    for fn in (linear_cross_entropy, fused_loss(F.cross_entropy)):
        torch.testing.assert_close(fn(hidden, weight, targets.to(dtype), options=OPTS).double(), gold)


_NO_COMPILER_SCRIPT = """
import torch
from lce_compile import FusedOptions, linear_cross_entropy
from lce_compile.testing import make_inputs, unfused_cross_entropy
hidden, weight, targets = make_inputs(512, 8, 1 << 17, seed=8)  # N * V = 2**26: eager chunks by default
hidden.requires_grad_()
loss = linear_cross_entropy(hidden, weight, targets)
loss.backward()
torch.testing.assert_close(loss.double(), unfused_cross_entropy(hidden.double(), weight.double(), targets),
                           rtol=1e-5, atol=0)
try:
    linear_cross_entropy(hidden, weight, targets, options=FusedOptions(compile=True))
except RuntimeError as exc:
    assert "C++ compiler" in str(exc) and "CXX" in str(exc), exc
else:
    raise AssertionError("compile=True without a compiler did not raise")
print("ok")
"""


def test_no_cxx_compiler(tmp_path):
    """A CPU without a working C++ compiler: the default (eager chunks on the CPU) runs; an explicit compile=True
    raises with the fix."""
    import os
    import subprocess
    import sys
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "cache"),
               PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", _NO_COMPILER_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]


def test_autocast_inside_user_compile_fullgraph():
    hidden, weight, targets = make_inputs(40, D, V, seed=9)
    fused = torch.compile(lambda h, w, t: linear_cross_entropy(h, w, t, options=OPTS), fullgraph=True,
                          backend="aot_eager")

    def under_autocast(fn, h, w, t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return fn(h, w, t)
    gold = _step(unfused_cross_entropy, hidden.double(), weight.double(), targets)
    ref = _step(unfused_cross_entropy, hidden, weight, targets, under_autocast)
    got = _step(fused, hidden, weight, targets, under_autocast)
    assert_no_less_accurate(got, ref, gold, factor=1.25)
