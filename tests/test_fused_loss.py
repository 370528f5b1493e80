import pytest
import torch
import torch.nn.functional as F

from lce_compile import FusedOptions, fused_loss
from lce_compile.testing import assert_no_less_accurate, forward_backward as run, make_inputs

SMALL = FusedOptions(chunk_size=16)
SHAPES = [(1, 8, 11), (37, 16, 101), ((3, 5), 8, 97), ((2, 33), 24, 1009)]
CE_KWARGS = [
    {},
    {"reduction": "sum"},
    {"reduction": "none"},
    {"ignore_index": 3},
    {"label_smoothing": 0.15},
    {"weight": "class"},
    {"weight": "class", "label_smoothing": 0.1},
    {"weight": "class", "reduction": "none", "label_smoothing": 0.05},
    {"weight": "class", "reduction": "sum", "ignore_index": 0},
]


def _unfused(fn, upcast=True):
    """fn applied to the full (N, V) logits (upcast to fp32, as fused_loss does by default), the result in
    targets' shape for per-row outputs."""
    def call(h, w, *rows, bias=None, **kw):
        logits = h.flatten(0, -2) @ w.T
        logits = logits if bias is None else logits + bias
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) if upcast else logits
        per_row = {k: v.flatten(0, h.dim() - 2) for k, v in kw.items()
                   if isinstance(v, torch.Tensor) and v.shape[: h.dim() - 1] == h.shape[:-1]}
        out = fn(logits, *(r.flatten(0, h.dim() - 2) for r in rows), **{**kw, **per_row})
        return out.view(h.shape[:-1]) if out.dim() else out
    return call


def _resolve(kw, vocab, dtype):
    if kw.get("weight") == "class":
        kw = dict(kw, weight=(torch.rand(vocab, generator=torch.Generator().manual_seed(1)) + 0.2).to(dtype))
    return kw


@pytest.mark.parametrize("fn", [F.cross_entropy, F.nll_loss], ids=lambda f: f.__name__)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("kw", CE_KWARGS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "default")
def test_torch_losses_every_keyword(fn, shape, kw):
    if fn is F.nll_loss and "label_smoothing" in kw:
        pytest.skip("nll_loss has no label_smoothing")
    hidden, weight, targets = make_inputs(*shape, seed=11)
    if "ignore_index" in kw:
        targets = torch.where(targets == -100, kw["ignore_index"], targets)
    upstream = torch.randn(targets.shape, dtype=torch.float64) if kw.get("reduction") == "none" else None
    gold = run(_unfused(fn), hidden, weight, targets, torch.float64, upstream=upstream,
               **_resolve(kw, shape[-1], torch.float64))
    got = run(fused_loss(fn, options=SMALL), hidden, weight, targets, upstream=upstream,
              **_resolve(kw, shape[-1], torch.float32))
    for g, want in zip(got, gold):
        assert g.shape == want.shape
        torch.testing.assert_close(g, want.float(), equal_nan=True)


def test_positional_class_weight_and_legacy_reduction_keywords():
    hidden, weight, targets = make_inputs(29, 8, 31, seed=5)
    class_weight = torch.rand(31) + 0.1
    want = F.cross_entropy(hidden @ weight.T, targets, class_weight)
    torch.testing.assert_close(fused_loss(F.cross_entropy)(hidden, weight, targets, class_weight), want)
    want = F.cross_entropy(hidden @ weight.T, targets, size_average=False)
    torch.testing.assert_close(fused_loss(F.cross_entropy)(hidden, weight, targets, size_average=False), want)


@pytest.mark.parametrize("upcast", [True, False], ids=["fp32_logits", "matmul_dtype_logits"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_generic_low_precision_is_no_less_accurate(dtype, upcast):
    """fused_loss(F.cross_entropy) on bf16/fp16 inputs, against the same call on unfused logits: by default
    fn((h @ w.T).float(), ...), an fp32 loss; with upcast=False fn(h @ w.T, ...) in the inputs' dtype."""
    hidden, weight, targets = make_inputs(1200, 48, 2053, seed=8)
    fused = fused_loss(F.cross_entropy, upcast=upcast, options=FusedOptions(chunk_size=256))
    ce = _unfused(F.cross_entropy, upcast=upcast)
    gold = run(ce, hidden, weight, targets, torch.float64)
    ref = run(ce, hidden, weight, targets, dtype)
    out = run(fused, hidden, weight, targets, dtype)
    assert out[0].dtype == ref[0].dtype == (torch.float32 if upcast else dtype)
    assert_no_less_accurate(out, ref, gold, )


def test_generic_fp32_class_weight_beside_bf16_inputs():
    """fused_loss(F.cross_entropy)(h_bf16, w_bf16, t, weight=w_fp32) runs and equals the unfused fp32-logit call."""
    hidden, weight, targets = make_inputs(300, 32, 517, seed=12)
    class_weight = torch.rand(517, generator=torch.Generator().manual_seed(3)) + 0.5
    fused = fused_loss(F.cross_entropy, options=FusedOptions(chunk_size=64))
    ref = run(_unfused(F.cross_entropy), hidden, weight, targets, torch.bfloat16, weight=class_weight)
    out = run(fused, hidden, weight, targets, torch.bfloat16, weight=class_weight)
    for r, o in zip(ref, out):
        assert o.dtype == r.dtype
        torch.testing.assert_close(o.float(), r.float(), rtol=2e-2, atol=1e-5)


def focal_rows(logits, targets, gamma=2.0, mask=None):
    """A user loss written for full logits: focal loss per row, optionally masked."""
    logp = logits.float().log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
    rows = -((1 - logp.exp()) ** gamma) * logp
    return rows if mask is None else rows * mask


def confidence_penalty_mean(logits, targets):
    """A scalar mean over kept rows: CE minus 0.1 * entropy."""
    logp = logits.float().log_softmax(-1)
    kept = targets != -100
    nll = -logp.gather(-1, targets.clamp(min=0)[:, None]).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return ((nll - 0.1 * entropy) * kept).sum() / kept.sum()


def sum_of_lse(logits, targets):
    return logits.float().logsumexp(-1).sum() - logits.float().gather(-1, targets[:, None]).sum()


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_custom_per_row_loss_any_upstream_gradient(shape):
    hidden, weight, targets = make_inputs(*shape, seed=4, ignored=0.0)
    mask = (torch.rand(targets.shape, generator=torch.Generator().manual_seed(2)) > 0.3).float()
    upstream = torch.randn(targets.shape, dtype=torch.float64)
    gold = run(_unfused(focal_rows), hidden, weight, targets, torch.float64, upstream=upstream, gamma=1.5,
               mask=mask.double())
    got = run(fused_loss(focal_rows, options=SMALL), hidden, weight, targets, upstream=upstream, gamma=1.5,
              mask=mask)
    for g, want in zip(got, gold):
        torch.testing.assert_close(g, want.float())


def test_custom_loss_with_two_row_inputs_and_bias():
    hidden, weight, targets = make_inputs((4, 9), 8, 37, seed=6, ignored=0.0)
    mask = (torch.arange(36).view(4, 9) % 3 != 0).float()
    bias = torch.randn(37)

    def masked(logits, targets, mask):
        return focal_rows(logits, targets, mask=mask)

    up = torch.randn(4, 9, dtype=torch.float64)
    gold = run(_unfused(masked), hidden, weight, targets, torch.float64, bias=bias, upstream=up, mask=mask.double())
    got = run(fused_loss(masked, options=SMALL), hidden, weight, targets, bias=bias, upstream=up, mask=mask)
    for g, want in zip(got, gold):
        torch.testing.assert_close(g, want.float())
    # the mask may also come positionally, as a second row input
    out = fused_loss(masked, options=SMALL)(hidden, weight, targets, mask, bias=bias)
    torch.testing.assert_close(out, gold[0].float())


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_declared_scalar_mean_over_kept_rows(shape):
    hidden, weight, targets = make_inputs(*shape, seed=12, ignored=0.3)
    if targets.numel() > 32:
        targets.view(-1)[:16] = -100  # a whole chunk ignored: its mean is 0/0 and must weigh nothing
    fused = fused_loss(confidence_penalty_mean, returns="mean", mean_over=lambda t: t != -100, options=SMALL)
    targets.view(-1)[-1] = 0  # at least one kept row: with none, the unfused gradient is 0/0
    gold = run(_unfused(confidence_penalty_mean), hidden, weight, targets, torch.float64)
    got = run(fused, hidden, weight, targets)
    for g, want in zip(got, gold):
        torch.testing.assert_close(g, want.float())


def test_declared_scalar_sum():
    hidden, weight, targets = make_inputs((3, 11), 16, 59, seed=13, ignored=0.0)
    gold = run(_unfused(sum_of_lse), hidden, weight, targets, torch.float64)
    got = run(fused_loss(sum_of_lse, returns="sum", options=SMALL), hidden, weight, targets)
    for g, want in zip(got, gold):
        torch.testing.assert_close(g, want.float())


def test_decorator_forms_and_repr():
    @fused_loss
    def plain(logits, targets):
        return F.cross_entropy(logits, targets, reduction="none")

    @fused_loss(returns="sum")
    def summed(logits, targets):
        return F.cross_entropy(logits, targets, reduction="sum")

    hidden, weight, targets = make_inputs(10, 8, 13, ignored=0.0)
    torch.testing.assert_close(plain(hidden, weight, targets).sum(), summed(hidden, weight, targets))
    assert plain.__name__ == "plain" and "returns='sum'" in repr(summed)


def test_scalar_without_declaration_is_refused():
    @fused_loss
    def mean_ce(logits, targets):
        return F.cross_entropy(logits, targets)

    hidden, weight, targets = make_inputs(40, 8, 13)
    with pytest.raises(ValueError, match=r"mean_ce returned a scalar.*returns='mean'"):
        mean_ce(hidden, weight, targets)


def test_declared_scalar_that_returns_rows_is_refused():
    fused = fused_loss(focal_rows, returns="sum")
    hidden, weight, targets = make_inputs(5, 8, 13, ignored=0.0)
    with pytest.raises(ValueError, match="must return a scalar"):
        fused(hidden, weight, targets)
