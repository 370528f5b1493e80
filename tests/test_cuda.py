"""The CUDA path: compiled chunk functions, exactness, precision, memory, syncs. Skipped without a GPU."""
import pytest
import torch
import torch.nn.functional as F

from lce_compile import FusedOptions, fused_loss, linear_cross_entropy
from reference import make_inputs, run, unfused_cross_entropy

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _cuda(*tensors):
    return tuple(t.cuda() for t in tensors)


@pytest.mark.parametrize("kw", [{}, {"softcap": 30.0, "z_loss": 1e-4}, {"label_smoothing": 0.1, "reduction": "sum"},
                                {"reduction": "none"}], ids=str)
@pytest.mark.parametrize("lead", [(1,), (777,), (3, 700)], ids=str)
def test_compiled_fp32_matches_fp64(lead, kw):
    hidden, weight, targets = _cuda(*make_inputs(lead, 64, 1031, seed=1))
    upstream = torch.randn(targets.shape, dtype=torch.float64, device="cuda") if kw.get("reduction") == "none" else None
    gold = run(unfused_cross_entropy, hidden, weight, targets, torch.float64, upstream=upstream, **kw)
    opts = FusedOptions(chunk_size=256)
    got = run(lambda h, w, t, **k: linear_cross_entropy(h, w, t, options=opts, **k), hidden, weight, targets,
              upstream=upstream, **kw)
    for g, want in zip(got, gold):
        # fp32 matmuls on the GPU may use TF32-free cuBLAS paths with another summation order
        torch.testing.assert_close(g, want.float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("generic", [False, True], ids=["linear_cross_entropy", "fused_loss"])
def test_low_precision_no_less_accurate_than_unfused(dtype, generic):
    hidden, weight, targets = _cuda(*make_inputs(4096, 512, 32003, seed=2))
    if generic:
        def ref_fn(h, w, t):
            return F.cross_entropy((h @ w.T).float(), t)
        fused = fused_loss(lambda logits, t: F.cross_entropy(logits.float(), t, reduction="none"))

        def out_fn(h, w, t):
            rows = fused(h, w, t)
            return rows.sum() / (t != -100).sum()
    else:
        ref_fn = unfused_cross_entropy

        def out_fn(h, w, t):
            return linear_cross_entropy(h, w, t)
    gold = run(ref_fn, hidden, weight, targets, torch.float64)
    ref = run(ref_fn, hidden, weight, targets, dtype)
    out = run(out_fn, hidden, weight, targets, dtype)
    for name, g, r, o in zip(("loss", "grad_hidden", "grad_weight"), gold, ref, out):
        err, ref_err = (o.double() - g).abs().mean(), (r.double() - g).abs().mean()
        noise = 16 * torch.finfo(torch.float32).eps * g.abs().mean()
        assert err <= 1.1 * ref_err + noise, f"{name}: {err:.2e} > 1.1 x unfused {ref_err:.2e}"


def test_memory_bounded_and_flat_in_tokens():
    peaks = {}
    for n in (4096, 16384):
        hidden, weight, targets = _cuda(*make_inputs(n, 1024, 65536, torch.bfloat16, seed=3))
        hidden.requires_grad_(), weight.requires_grad_()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        linear_cross_entropy(hidden, weight, targets, options=FusedOptions(chunk_size=1024)).backward()
        torch.cuda.synchronize()
        # the gradients, and the fp32 accumulator of grad_weight (sums across chunks stay in fp32)
        grads = hidden.grad.nbytes + weight.grad.nbytes + weight.numel() * 4
        peaks[n] = torch.cuda.max_memory_allocated() - base - grads
        assert peaks[n] <= 4 * 1024 * 65536 * 4, "more than four fp32 (C, V) buffers per chunk"
    assert peaks[16384] - peaks[4096] <= 12288 * 1024 * 2 + (1 << 20)


def test_inside_user_compile_fullgraph_and_no_syncs():
    hidden, weight, targets = _cuda(*make_inputs(3000, 256, 8191, torch.bfloat16, seed=4))
    loss_fn = torch.compile(lambda h, w, t: linear_cross_entropy(h, w, t, softcap=30.0), fullgraph=True)
    gold = run(unfused_cross_entropy, hidden, weight, targets, torch.float64, softcap=30.0)
    ref = run(unfused_cross_entropy, hidden, weight, targets, softcap=30.0)
    got = run(loss_fn, hidden, weight, targets)
    for name, g, r, o in zip(("loss", "grad_hidden", "grad_weight"), gold, ref, got):
        err, ref_err = (o.double() - g).abs().mean(), (r.double() - g).abs().mean()
        noise = 16 * torch.finfo(torch.float32).eps * g.abs().mean()
        assert err <= 1.1 * ref_err + noise, f"{name}: {err:.2e} > 1.1 x unfused {ref_err:.2e}"
    opts = FusedOptions(validate=False)
    run(lambda h, w, t: linear_cross_entropy(h, w, t, options=opts), hidden, weight, targets)  # warm up
    torch.cuda.set_sync_debug_mode("error")
    try:
        run(lambda h, w, t: linear_cross_entropy(h, w, t, options=opts), hidden, weight, targets)
    finally:
        torch.cuda.set_sync_debug_mode(0)
