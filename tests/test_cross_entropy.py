import zlib

import pytest
import torch
import torch.nn.functional as F

from lce_compile import AuxRequest, FusedOptions, LinearCrossEntropyLoss, fused_loss, linear_cross_entropy
from lce_compile.testing import assert_no_less_accurate, forward_backward as run, make_inputs, unfused_cross_entropy
from memtrack import InsideFusedOps

SMALL = FusedOptions(chunk_size=16)  # many chunks, a ragged last one
# (lead shape, D, V): N=1, N % chunk != 0, 3-D hidden, prime V, N a multiple of the chunk
SHAPES = [(1, 8, 11), (37, 16, 101), ((3, 5), 8, 97), (64, 32, 257), ((2, 33), 24, 1009)]
KWARGS = [
    {},
    {"reduction": "sum"},
    {"reduction": "none"},
    {"label_smoothing": 0.1},
    {"softcap": 3.0},
    {"z_loss": 1e-2},
    {"ignore_index": 5},
    {"softcap": 2.0, "z_loss": 1e-3, "label_smoothing": 0.2, "reduction": "sum"},
    {"logit_scale": 0.0625},
    {"logit_scale": 2.5, "softcap": 3.0, "reduction": "sum"},
]


def _fused(h, w, t, **kw):
    return linear_cross_entropy(h, w, t, options=SMALL, **kw)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("kw", KWARGS, ids=lambda kw: ",".join(kw) or "default")
def test_matches_unfused_fp32(shape, kw):
    hidden, weight, targets = make_inputs(*shape, seed=zlib.crc32(str(shape).encode()))
    if kw.get("ignore_index") == 5:
        targets = torch.where(targets == -100, 5, targets)
    upstream = torch.randn(targets.shape, dtype=torch.float64) if kw.get("reduction") == "none" else None
    gold = run(unfused_cross_entropy, hidden, weight, targets, torch.float64, upstream=upstream, **kw)
    got = run(_fused, hidden, weight, targets, upstream=upstream, **kw)
    for g, want in zip(got, gold):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, want.float(), equal_nan=True)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_class_weight_and_bias(reduction):
    hidden, weight, targets = make_inputs(45, 16, 53, seed=3)
    g = torch.Generator().manual_seed(4)
    bias, class_weight = torch.randn(53, generator=g), torch.rand(53, generator=g) + 0.1
    kw = dict(class_weight=class_weight, label_smoothing=0.1, reduction=reduction)
    upstream = torch.randn(45, dtype=torch.float64) if reduction == "none" else None
    gold = run(unfused_cross_entropy, hidden, weight, targets, torch.float64, bias=bias, upstream=upstream,
               class_weight=class_weight.double(), label_smoothing=0.1, reduction=reduction)
    got = run(_fused, hidden, weight, targets, bias=bias, upstream=upstream, **kw)
    assert len(got) == 4
    for g_, want in zip(got, gold):
        torch.testing.assert_close(g_, want.float())


def test_all_ignored_rows_nan_loss_zero_grads():
    hidden, weight, targets = make_inputs(20, 8, 31)
    targets = torch.full_like(targets, -100)
    gold = run(lambda h, w, t: F.cross_entropy(h @ w.T, t), hidden, weight, targets, torch.float64)
    got = run(_fused, hidden, weight, targets)
    assert torch.isnan(got[0]) and torch.isnan(gold[0])
    for g_, want in zip(got[1:], gold[1:]):
        assert torch.equal(g_, want.float()) and not g_.any()


def test_empty_batch_behaves_like_unfused():
    hidden, weight = torch.randn(0, 8, requires_grad=True), torch.randn(13, 8, requires_grad=True)
    targets = torch.zeros(0, dtype=torch.long)
    for reduction in ("mean", "sum", "none"):
        want = F.cross_entropy(hidden @ weight.T, targets, reduction=reduction)
        got = linear_cross_entropy(hidden, weight, targets, reduction=reduction)
        torch.testing.assert_close(got, want, equal_nan=True)
        got.sum().backward()
        assert weight.grad is not None and not weight.grad.any()
        weight.grad = None


LOW_PRECISION_CASES = [((2048,), 64, 1031, {}), ((4, 300), 48, 2053, {"softcap": 10.0, "z_loss": 1e-4}),
                       ((1500,), 32, 4099, {"label_smoothing": 0.1, "reduction": "sum"})]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape,dim,vocab,kw", LOW_PRECISION_CASES, ids=lambda c: str(c))
def test_no_less_accurate_than_unfused(dtype, shape, dim, vocab, kw):
    hidden, weight, targets = make_inputs(shape, dim, vocab, seed=7)
    gold = run(unfused_cross_entropy, hidden, weight, targets, torch.float64, **kw)
    ref = run(unfused_cross_entropy, hidden, weight, targets, dtype, **kw)
    out = run(lambda h, w, t, **k: linear_cross_entropy(h, w, t, options=FusedOptions(chunk_size=256), **k),
              hidden, weight, targets, dtype, **kw)
    assert_no_less_accurate(out, ref, gold, )


def test_aux_outputs():
    hidden, weight, targets = make_inputs((3, 7), 16, 41, seed=5)
    kw = dict(softcap=4.0, z_loss=1e-3)
    loss, aux = linear_cross_entropy(hidden, weight, targets, options=SMALL,
                                     return_aux=AuxRequest(loss=True, lse=True, correct=True), **kw)
    logits = 4.0 * torch.tanh((hidden.double() @ weight.double().T) / 4.0)
    kept = targets != -100
    torch.testing.assert_close(aux.lse, logits.logsumexp(-1).float())
    assert torch.equal(aux.correct, (logits.argmax(-1) == targets) & kept)
    want = unfused_cross_entropy(hidden.double(), weight.double(), targets, reduction="none", **kw)
    torch.testing.assert_close(aux.loss, want.float())
    torch.testing.assert_close(loss, want.sum().float() / kept.sum())
    assert aux.loss.shape == aux.lse.shape == aux.correct.shape == targets.shape
    only_lse = linear_cross_entropy(hidden, weight, targets, return_aux=AuxRequest(lse=True))[1]
    assert only_lse.loss is None and only_lse.correct is None and only_lse.lse is not None


def test_module_form_matches_function():
    hidden, weight, targets = make_inputs(30, 16, 67, seed=9)
    class_weight = torch.rand(67) + 0.5
    module = LinearCrossEntropyLoss(class_weight=class_weight, softcap=5.0, z_loss=1e-3, options=SMALL)
    assert "softcap=5.0" in repr(module) and module.class_weight is not None
    got = run(module, hidden, weight, targets)
    want = run(_fused, hidden, weight, targets, class_weight=class_weight, softcap=5.0, z_loss=1e-3)
    for g_, w_ in zip(got, want):
        torch.testing.assert_close(g_, w_)


@pytest.mark.parametrize("frozen", ["hidden", "weight", "bias"])
def test_frozen_inputs_get_no_gradient(frozen):
    hidden, weight, targets = make_inputs(25, 8, 19, seed=2)
    tensors = {"hidden": hidden.clone(), "weight": weight.clone(), "bias": torch.randn(19)}
    for name, t in tensors.items():
        t.requires_grad_(name != frozen)
    loss = linear_cross_entropy(tensors["hidden"], tensors["weight"], targets, bias=tensors["bias"], options=SMALL)
    loss.backward()
    ref = {n: t.detach().double().requires_grad_(n != frozen) for n, t in tensors.items()}
    unfused_cross_entropy(ref["hidden"], ref["weight"], targets, bias=ref["bias"]).backward()
    for name, t in tensors.items():
        if name == frozen:
            assert t.grad is None
        else:
            torch.testing.assert_close(t.grad, ref[name].grad.float())


def test_no_grad_computes_only_the_loss():
    hidden, weight, targets = make_inputs(40, 8, 23, seed=1)
    hidden.requires_grad_(), weight.requires_grad_()
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, targets, options=SMALL)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, unfused_cross_entropy(hidden.double(), weight.double(), targets).float())


def test_grad_weight_dtype_option_widens_the_accumulator():
    """An fp64 accumulator for an fp32 weight: the same gradient, in the weight's dtype, no less accurate."""
    hidden, weight, targets = make_inputs(300, 16, 101, seed=21)
    gold = run(unfused_cross_entropy, hidden, weight, targets, torch.float64)
    base = run(_fused, hidden, weight, targets)
    wide = run(lambda h, w, t: linear_cross_entropy(
        h, w, t, options=FusedOptions(chunk_size=16, grad_weight_dtype=torch.float64)), hidden, weight, targets)
    assert wide[2].dtype == torch.float32
    torch.testing.assert_close(wide[2], base[2])
    assert (wide[2].double() - gold[2]).abs().mean() <= (base[2].double() - gold[2]).abs().mean() * 1.01


def test_z_loss_is_a_mean_over_kept_tokens_whatever_the_class_weights():
    """The z-loss is a per-token regulariser (PaLM): scaling every class weight leaves the loss unchanged, and the
    z-term's mean divides by the count of kept tokens."""
    hidden, weight, targets = make_inputs(300, 32, 97, seed=31)
    class_weight = torch.rand(97, generator=torch.Generator().manual_seed(4)) + 0.2
    kw = dict(z_loss=1e-2, options=FusedOptions(chunk_size=64))
    for cw in (class_weight, 2 * class_weight):
        got = run(lambda h, w, t: linear_cross_entropy(h, w, t, class_weight=cw, **kw), hidden, weight, targets)
        gold = run(lambda h, w, t: unfused_cross_entropy(h, w, t, class_weight=cw, z_loss=1e-2), hidden, weight,
                   targets, torch.float64)
        for g, w_ in zip(got, gold):
            torch.testing.assert_close(g, w_.float())
    scaled = linear_cross_entropy(hidden, weight, targets, class_weight=2 * class_weight, **kw)
    torch.testing.assert_close(scaled, linear_cross_entropy(hidden, weight, targets, class_weight=class_weight, **kw))
    kept = targets != -100
    z_term = 1e-2 * (hidden.double() @ weight.double().T).logsumexp(-1).square()[kept].sum() / kept.sum()
    ce = unfused_cross_entropy(hidden.double(), weight.double(), targets, class_weight=class_weight.double())
    torch.testing.assert_close(scaled.double(), ce + z_term)


@pytest.mark.parametrize("kw", [{}, {"reduction": "none"}, {"label_smoothing": 0.1, "reduction": "none"},
                                {"return_aux": AuxRequest(lse=True, correct=True), "reduction": "none"}],
                         ids=["mean", "none", "smoothing", "aux"])
def test_a_single_unbatched_token(kw):
    """hidden (D,), a 0-dim target: per-token outputs are 0-dim, as F.cross_entropy's on (V,) logits."""
    hidden, weight, _ = make_inputs(1, 16, 53, seed=32)
    hidden, target = hidden[0], torch.tensor(7)
    out = linear_cross_entropy(hidden, weight, target, **kw)
    loss, aux = out if "return_aux" in kw else (out, None)
    logits = hidden.double() @ weight.double().T
    want = F.cross_entropy(logits, target, label_smoothing=kw.get("label_smoothing", 0.0))
    assert loss.shape == () and (aux is None or aux.lse.shape == aux.correct.shape == ())
    torch.testing.assert_close(loss.double(), want)
    if aux is not None:
        torch.testing.assert_close(aux.lse.double(), logits.logsumexp(-1))
        assert aux.correct.item() == (logits.argmax().item() == 7)
    fused = fused_loss(F.cross_entropy)(hidden, weight, target, reduction="none")
    assert fused.shape == () and torch.allclose(fused.double(), F.cross_entropy(logits, target))


class _MatmulFlops(InsideFusedOps):
    """Multiply-adds of every matmul, inside the fused operators too."""

    def __init__(self):
        super().__init__()
        self.flops = 0

    def dispatch(self, func, args, kwargs):
        packet = func.overloadpacket
        if packet in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_):
            a, b = args[:2] if packet is torch.ops.aten.mm else args[1:3]
            self.flops += a.shape[0] * a.shape[1] * b.shape[1]
        return func(*args, **kwargs)


@pytest.mark.parametrize("loss", ["linear_cross_entropy", "none", "fused_loss(F.cross_entropy)", "kd"])
def test_rows_without_a_loss_cost_nothing(loss):
    """Ignored targets: only the kept rows reach the matmuls (their count comes back with the target check's one
    read-back), so the matmul work is the kept fraction of the work on every row; the ignored rows' values and
    gradients are exact zeros, and the result is the unfused one."""
    from lce_compile import linear_kd_loss
    from lce_compile.testing import unfused_kd

    hidden, weight, targets = make_inputs(400, 24, 97, seed=33, ignored=0.5)
    t_hidden, t_weight, _ = make_inputs(400, 24, 97, seed=34)
    kept = int((targets != -100).sum())
    fused = {
        "linear_cross_entropy": lambda h, w, t, o: linear_cross_entropy(h, w, t, label_smoothing=0.1, options=o),
        "none": lambda h, w, t, o: linear_cross_entropy(h, w, t, reduction="none", options=o),
        "fused_loss(F.cross_entropy)": lambda h, w, t, o: fused_loss(F.cross_entropy)(h, w, t, options=o),
        "kd": lambda h, w, t, o: linear_kd_loss(h, w, t_hidden, t_weight, t, kind="jsd", options=o),
    }[loss]
    unfused = {
        "linear_cross_entropy": lambda h, w, t: unfused_cross_entropy(h, w, t, label_smoothing=0.1),
        "none": lambda h, w, t: unfused_cross_entropy(h, w, t, reduction="none"),
        "fused_loss(F.cross_entropy)": lambda h, w, t: F.cross_entropy(h @ w.T, t),
        "kd": lambda h, w, t: unfused_kd(h, w, t_hidden.to(h.dtype), t_weight.to(h.dtype), t, kind="jsd"),
    }[loss]
    upstream = torch.randn(400, generator=torch.Generator().manual_seed(3)) if loss == "none" else None
    with _MatmulFlops() as gathered:
        got = run(lambda h, w, t: fused(h, w, t, None), hidden, weight, targets, upstream=upstream)
    gold = run(unfused, hidden, weight, targets, torch.float64, upstream=upstream)
    for g, w_ in zip(got, gold):
        torch.testing.assert_close(g, w_.float())
    assert (got[1][targets == -100] == 0).all()  # exact zeros, not small numbers
    if loss == "none":
        assert (got[0][targets == -100] == 0).all()
    # without the read-back (validate=False, or inside torch.compile) every row is computed, to the same result
    with _MatmulFlops() as every_row:
        again = run(lambda h, w, t: fused(h, w, t, FusedOptions(validate=False)), hidden, weight, targets,
                    upstream=upstream)
    assert gathered.flops * 400 == every_row.flops * kept, (gathered.flops, every_row.flops, kept)
    for g, a in zip(got, again):
        torch.testing.assert_close(g, a)
