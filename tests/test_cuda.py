"""The CUDA path: compiled chunk functions, exactness, precision, memory, syncs. Skipped without a GPU."""
import functools

import pytest
import torch
import torch.nn.functional as F

from lce_compile import FusedOptions, fused_loss, linear_cross_entropy, linear_token_logprobs, policy
from lce_compile.testing import assert_no_less_accurate, forward_backward as run, make_inputs, unfused_cross_entropy

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
            return linear_cross_entropy(h, w, t, options=FusedOptions(chunk_size=1024))
    if generic:
        fused = functools.partial(fused, options=FusedOptions(chunk_size=1024))
    # 4 chunks: the weight gradient is summed in bf16/fp16 across them (one rounding per chunk)
    gold = run(ref_fn, hidden, weight, targets, torch.float64)
    ref = run(ref_fn, hidden, weight, targets, dtype)
    out = run(out_fn, hidden, weight, targets, dtype)
    assert_no_less_accurate(out, ref, gold, )


@pytest.mark.parametrize("loss", ["cross_entropy", "token_logprobs"])
def test_fp32_grad_weight_accumulator_rounds_once(loss):
    """FusedOptions(grad_weight_dtype=torch.float32): a bf16 weight gradient over 8 chunks is as accurate as
    the unfused code's one matmul, and more accurate than the default bf16 sum."""
    hidden, weight, targets = _cuda(*make_inputs(4096, 512, 32003, seed=12))
    targets = targets.clamp(min=0)
    if loss == "cross_entropy":
        ref_fn = unfused_cross_entropy

        def fused(h, w, t, **o):
            return linear_cross_entropy(h, w, t, options=FusedOptions(chunk_size=512, **o))
    else:
        def ref_fn(h, w, t):
            z = h @ w.T
            z = z.to(torch.promote_types(z.dtype, torch.float32))
            return z.log_softmax(-1).gather(-1, t[:, None]).square().mean()

        def fused(h, w, t, **o):
            return linear_token_logprobs(h, w, t, options=FusedOptions(chunk_size=512, **o)).square().mean()
    gold = run(ref_fn, hidden, weight, targets, torch.float64)
    ref = run(ref_fn, hidden, weight, targets, torch.bfloat16)
    default = run(fused, hidden, weight, targets, torch.bfloat16)
    wide = run(functools.partial(fused, grad_weight_dtype=torch.float32), hidden, weight, targets, torch.bfloat16)
    assert wide[2].dtype == torch.bfloat16
    assert_no_less_accurate(wide, ref, gold, factor=(1.1, 1.1, 1.02))
    err = [(g.double() - gold[2]).abs().mean() for g in (wide[2], default[2])]
    assert err[0] < err[1], f"fp32 accumulator {err[0]:.3e} vs default {err[1]:.3e}"


def _peak_above_inputs(fn, *args):
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn(*args)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _step(loss_fn, hidden, weight, targets):
    hidden.grad = weight.grad = None
    loss_fn(hidden, weight, targets).backward()


def test_memory_is_gradients_plus_one_chunk_and_flat_in_tokens():
    chunk, vocab = 1024, 65536
    loss_fn = functools.partial(linear_cross_entropy, options=FusedOptions(chunk_size=chunk))
    extra = {}
    for n in (4096, 16384):
        hidden, weight, targets = _cuda(*make_inputs(n, 1024, vocab, torch.bfloat16, seed=3))
        hidden.requires_grad_(), weight.requires_grad_()
        _step(loss_fn, hidden, weight, targets)  # warm-up: compilation, cuBLAS workspaces
        hidden.grad = weight.grad = None
        peak = _peak_above_inputs(_step, loss_fn, hidden, weight, targets)
        # the kept rows (10% of the targets are ignored) in near-equal chunks of at most `chunk` rows
        rows = max(end - start for start, end in policy.chunk_bounds(int((targets != -100).sum()), chunk))
        extra[n] = peak - hidden.grad.nbytes - weight.grad.nbytes - rows * vocab * 2
        # beyond one bf16 (C, V) buffer, written over by its gradient: a gathered (C, D) chunk of hidden, and
        # O(N) vectors
        assert extra[n] <= chunk * 1024 * 2 + 64 * n + (4 << 20), f"N={n}: {extra[n] / 2**20:.1f} MiB over grads"
    assert extra[16384] - extra[4096] <= 12288 * 64 + (1 << 20)


@pytest.mark.parametrize("d,chunk_memory,bound", [(4096, None, 1.5), (1024, 0.1, 1.1), (1024, None, None)],
                         ids=["default", "lean", "default-small-head"])
def test_policy_keeps_peak_within_floor_multiple(d, chunk_memory, bound):
    """The default is at most 1.5x the gradients' bytes (the floor) for a head of 1 GiB; chunk_memory=0.1 at most
    1.1x; a small head's default chunk holds 512 MiB of logits (its bound: the floor plus that, and 5%)."""
    hidden, weight, targets = _cuda(*make_inputs(8192, d, 131072 if d == 4096 else 65536, torch.bfloat16, seed=5))
    hidden.requires_grad_(), weight.requires_grad_()
    loss_fn = functools.partial(linear_cross_entropy, options=FusedOptions(chunk_memory=chunk_memory))
    _step(loss_fn, hidden, weight, targets)
    hidden.grad = weight.grad = None
    peak = _peak_above_inputs(_step, loss_fn, hidden, weight, targets)
    floor = hidden.numel() * 2 + weight.numel() * 2
    if bound is None:
        bound = (floor + 1.05 * (512 << 20)) / floor
    assert peak <= bound * floor, f"peak {peak / floor:.3f} x floor > {bound:.3f}"


def test_forward_only_peak_is_one_chunk():
    chunk, vocab = 1024, 65536
    hidden, weight, targets = _cuda(*make_inputs(8192, 1024, vocab, torch.bfloat16, seed=6))
    loss_fn = functools.partial(linear_cross_entropy, options=FusedOptions(chunk_size=chunk))
    with torch.no_grad():
        gold = unfused_cross_entropy(hidden.double(), weight.double(), targets)
        loss_fn(hidden, weight, targets)
        peak = _peak_above_inputs(loss_fn, hidden, weight, targets)
        torch.testing.assert_close(loss_fn(hidden, weight, targets).double(), gold, rtol=2e-3, atol=0)
    assert peak <= chunk * vocab * 2 + (4 << 20), f"{peak / 2**20:.1f} MiB"


def test_compiles_stay_bounded_when_tokens_change_every_step():
    from torch._dynamo.utils import counters
    weight = torch.randn(4099, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    loss_fn = functools.partial(linear_cross_entropy, options=FusedOptions(chunk_size=512, validate=False))
    counters.clear()
    for n in (700, 1000, 1537, 2048, 2500, 3001, 4097, 5000):
        hidden = torch.randn(n, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        targets = torch.randint(0, 4099, (n,), device="cuda")
        loss_fn(hidden, weight, targets).backward()
    compiles = counters["stats"]["unique_graphs"]
    assert compiles <= 3, f"{compiles} graphs compiled for 8 token counts"


def test_inside_user_compile_fullgraph_and_no_syncs():
    hidden, weight, targets = _cuda(*make_inputs(3000, 256, 8191, torch.bfloat16, seed=4))
    opts = FusedOptions(chunk_size=1024)  # 4 chunks
    loss_fn = torch.compile(lambda h, w, t: linear_cross_entropy(h, w, t, softcap=30.0, options=opts),
                            fullgraph=True)
    gold = run(unfused_cross_entropy, hidden, weight, targets, torch.float64, softcap=30.0)
    ref = run(unfused_cross_entropy, hidden, weight, targets, softcap=30.0)
    got = run(loss_fn, hidden, weight, targets)
    # the weight gradient is summed across the 4 chunks in bf16, as on the eager CUDA path (4 roundings
    # instead of 1: docs/benchmarks.md); the loss and grad_hidden have no sums across chunks in bf16
    assert_no_less_accurate(got, ref, gold, factor=(1.1, 1.1, 1.25))
    opts = FusedOptions(validate=False)
    run(lambda h, w, t: linear_cross_entropy(h, w, t, options=opts), hidden, weight, targets)  # warm up
    torch.cuda.set_sync_debug_mode("error")
    try:
        run(lambda h, w, t: linear_cross_entropy(h, w, t, options=opts), hidden, weight, targets)
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_inside_user_compile_keeps_the_eager_peak_and_result():
    """One operator to the compiler: inside torch.compile(fullgraph=True) (Inductor) the peak stays within 1.05x
    of the eager call's, and the gradients are the eager ones."""
    hidden, weight, targets = _cuda(*make_inputs(8192, 1024, 65536, torch.bfloat16, seed=8))
    # no ignored targets: an eager call computes the kept rows only (smaller near-equal chunks), a compiled one
    # every row, which this test is not about
    targets = targets.clamp(min=0)
    hidden.requires_grad_(), weight.requires_grad_()
    eager = functools.partial(linear_cross_entropy, z_loss=1e-4)
    compiled = torch.compile(lambda h, w, t: linear_cross_entropy(h, w, t, z_loss=1e-4), fullgraph=True)
    peaks, grads = {}, {}
    for name, loss_fn in (("eager", eager), ("compiled", compiled)):
        _step(loss_fn, hidden, weight, targets)  # warm-up: compilation, cuBLAS workspaces
        hidden.grad = weight.grad = None
        peaks[name] = _peak_above_inputs(_step, loss_fn, hidden, weight, targets)
        grads[name] = hidden.grad.clone(), weight.grad.clone()
    assert peaks["compiled"] <= 1.05 * peaks["eager"], f"{peaks}"
    for got, want in zip(grads["compiled"], grads["eager"]):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_distillation_bf16_errors_and_memory(kind):
    from lce_compile import linear_kd_loss
    from lce_compile.testing import unfused_kd
    n, vocab, chunk = 4096, 32003, 512
    hidden, weight, targets = _cuda(*make_inputs(n, 256, vocab, seed=9))
    t_hidden, t_weight, _ = _cuda(*make_inputs(n, 512, vocab, seed=10))
    opts = FusedOptions(chunk_size=chunk)

    def run_kd(fn, dtype, **kw):
        h, w = hidden.to(dtype).requires_grad_(), weight.to(dtype).requires_grad_()
        loss = fn(h, w, t_hidden.to(dtype), t_weight.to(dtype), targets, kind=kind, **kw)
        loss.backward()
        return loss.detach(), h.grad, w.grad

    gold = run_kd(unfused_kd, torch.float64)
    ref = run_kd(unfused_kd, torch.bfloat16)
    got = run_kd(linear_kd_loss, torch.bfloat16, options=opts)  # 8 chunks
    assert_no_less_accurate(got, ref, gold, factor=(1.1, 1.1, 1.25))
    h, w = hidden.bfloat16().requires_grad_(), weight.bfloat16().requires_grad_()
    th, tw = t_hidden.bfloat16(), t_weight.bfloat16()
    step = lambda: linear_kd_loss(h, w, th, tw, targets, kind=kind, options=opts).backward()  # noqa: E731
    step()
    h.grad = w.grad = None
    extra = _peak_above_inputs(step) - h.grad.nbytes - w.grad.nbytes
    # the student's chunk (overwritten by its gradient) and the teacher's: two bf16 (C, V) buffers, no other
    bound = 2 * chunk * vocab * 2 + (8 << 20)
    assert extra <= bound, f"{extra / 2**20:.1f} MiB over the gradients"


@pytest.mark.parametrize("rows", [750, 1000], ids=["750_rows", "1000_rows"])
def test_chunk_size_does_not_cost_precision(rows):
    """cuBLAS sums a split-K matmul in bf16 for some chunk shapes (750 rows here) unless told otherwise: the
    chunked loss must stay as precise as the unfused one, whatever the chunk size."""
    hidden, weight, targets = _cuda(*make_inputs(3000, 256, 8191, torch.bfloat16, seed=4))
    opts = FusedOptions(chunk_size=rows)
    gold = run(unfused_cross_entropy, hidden, weight, targets, torch.float64)
    ref = run(unfused_cross_entropy, hidden, weight, targets)
    got = run(lambda h, w, t: linear_cross_entropy(h, w, t, options=opts), hidden, weight, targets)
    assert_no_less_accurate(got, ref, gold, factor=(1.1, 1.1, 1.25))
    assert torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction  # the user's setting, restored


def test_generic_fp32_logits_and_fp32_class_weight():
    """fused_loss(F.cross_entropy) on bf16 inputs equals F.cross_entropy((h @ w.T).float(), ...), an fp32
    class weight included."""
    hidden, weight, targets = _cuda(*make_inputs(4096, 512, 32003, seed=2))
    class_weight = torch.rand(32003, device="cuda", generator=torch.Generator("cuda").manual_seed(0)) + 0.5
    fused = fused_loss(F.cross_entropy, options=FusedOptions(chunk_size=1024))
    def unfused(h, w, t, weight):
        logits = h @ w.T
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # .float(); fp64 stays fp64
        return F.cross_entropy(logits, t, weight=weight.to(logits.dtype))
    gold = run(unfused, hidden, weight, targets, torch.float64, weight=class_weight.double())
    ref = run(unfused, hidden, weight, targets, torch.bfloat16, weight=class_weight)
    out = run(fused, hidden, weight, targets, torch.bfloat16, weight=class_weight)
    assert out[0].dtype == torch.float32
    assert_no_less_accurate(out, ref, gold, factor=1.25)
