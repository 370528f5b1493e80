"""Other projects' published test grids, written fresh against our API.

What carries over is facts (shapes, options, dtypes, input distributions, tolerances, conventions), never code.
Each section names the peer's files and maps its conventions to ours in a comment; where a convention differs
on purpose, the test says so. Every case compares with an unfused reference written here from full logits, run in
fp64 on the same inputs (rounded to the case's dtype first). Grids are cut where a peer's size only buys time
(each cut is said where it is made), so that the file runs in about 15 s on 2 CPU cores.

Sources:
- PyTorch 2.13, ``F.linear_cross_entropy``: ``torch/testing/_internal/common_methods_invocations.py``
  (``sample_inputs_linear_cross_entropy`` over ``sample_inputs_linear``), ``common_modules.py``
  (``module_inputs_torch_nn_LinearCrossEntropyLoss``), pytorch/pytorch ``test/nn/test_linear_cross_entropy.py``.
- Liger Kernel (linkedin/Liger-Kernel): ``test/transformers/test_fused_linear_cross_entropy.py`` (with
  ``test_cross_entropy.py``'s z-loss reference), ``test/transformers/test_fused_linear_jsd.py`` (with
  ``test_jsd.py``'s reference), ``test/chunked_loss/test_jsd_loss.py``, ``test_grpo_loss.py``, ``test_dpo_loss.py``.
- Cut Cross-Entropy (apple/ml-cross-entropy): ``tests/test_cce_loss_forward.py``, ``test_cce_loss_backward.py``,
  ``test_cce_lse.py``, ``test_compute_z_loss.py``.
- TRL (huggingface/trl): ``tests/test_utils.py`` (``TestChunkedLogProbFunction``, ``TestPatchChunkedLMHead``,
  ``TestEntropyFromLogits``, ``TestSelectiveLogSoftmax``), ``tests/experimental/test_gkd_trainer.py`` and
  ``tests/experimental/test_distillation_trainer.py`` (the generalized JSD).
"""
import itertools
import zlib

import pytest
import torch
import torch.nn.functional as F

from lce_compile import (AuxRequest, FusedOptions, LinearCrossEntropyLoss, linear_cross_entropy, linear_dpo_loss,
                         linear_grpo_loss, linear_kd_loss, linear_token_logprobs)

F64, F32, BF16, F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16


# ---------------------------------------------------------------------------------------------------------------
# Helpers: seeded inputs, forward + backward, the two comparisons, the unfused references
# ---------------------------------------------------------------------------------------------------------------

def _gen(*key):
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _wide(dtype):
    return torch.promote_types(dtype, F32)


def _run(fn, dtype, diff, data=(), upstream=None):
    """fn(*diff leaves, *data) in ``dtype`` -> (value, *grads of diff). ``fn`` returns the value, or
    ``(value, objective)``; the default objective is ``sum(value * upstream)`` (``upstream`` None: ``sum(value)``)."""
    leaves = [None if t is None else t.detach().to(dtype).requires_grad_() for t in diff]
    rest = [t.detach().to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in data]
    out = fn(*leaves, *rest)
    value, objective = out if isinstance(out, tuple) else (out, None)
    if objective is None:
        objective = value.double().sum() if upstream is None else (value.double() * upstream).sum()
    objective.backward()
    return (value.detach(), *(None if t is None else t.grad for t in leaves))


def _close(got, want, atol, rtol):
    for i, (g, w) in enumerate(zip(got, want)):
        if g is None and w is None:
            continue
        torch.testing.assert_close(g.double(), w.double(), atol=atol, rtol=rtol, equal_nan=True,
                                   msg=lambda m: f"output {i} (0 = value, then the gradients): {m}")


def _no_worse(got, ref, gold, atol, rtol):
    """Elementwise ``|got - gold| <= |ref - gold| + atol + rtol |gold|``: no further from fp64 than the unfused code in
    the same dtype (``ref``), plus the peer's tolerance. Cut Cross-Entropy's criterion, used for every bf16/fp16 case:
    an elementwise tolerance against fp64 alone would charge us the inputs' own rounding."""
    for i, (g, r, w) in enumerate(zip(got, ref, gold)):
        if g is None and w is None:
            continue
        g, r, w = g.double(), r.double(), w.double()
        excess = (g - w).abs() - (r - w).abs() - atol - rtol * w.abs()
        assert not (excess > 0).any(), (f"output {i} (0 = value): {int((excess > 0).sum())} elements past the "
                                        f"unfused code's error + tolerance, worst by {excess.max().item():.3g}")


def _logits(h, w, b=None):
    """The unfused head, ``F.linear`` (nn.Linear's, one rounding with the bias inside) in the inputs' dtype, widened
    to fp32 after it (fp64 stays), as HF and TRL do. Cut Cross-Entropy's reference adds the bias after the matmul,
    which in bf16/fp16 rounds the logits twice; F.linear is the unfused code a model runs."""
    return F.linear(h, w, b).to(_wide(h.dtype))


def _ce_ref(h, w, t, b=None, *, class_weight=None, ignore_index=-100, label_smoothing=0.0, softcap=None, z_loss=0.0,
            reduction="mean"):
    z = _logits(h, w, b)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    flat, tf = z.reshape(-1, z.shape[-1]), t.reshape(-1)
    cw = None if class_weight is None else class_weight.to(flat.dtype)
    kw = dict(weight=cw, ignore_index=ignore_index, label_smoothing=label_smoothing)
    kept = tf != ignore_index
    z_term = z_loss * flat.logsumexp(-1).square() * kept  # PaLM's z-loss per kept token
    if reduction == "none":
        return (F.cross_entropy(flat, tf, reduction="none", **kw) + z_term).reshape(t.shape)
    if reduction == "sum":
        return F.cross_entropy(flat, tf, reduction="sum", **kw) + z_term.sum()
    loss = F.cross_entropy(flat, tf, reduction="mean", **kw)
    return loss + z_term.sum() / kept.sum() if z_loss else loss  # the z-loss: a mean over kept tokens


def _logprob_ref(h, w, ids, b=None, temperature=1.0):
    z = _logits(h, w, b) / temperature
    logp = z.log_softmax(-1)
    return logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1)


def _kd_ref(h, w, th, tw, t=None, *, kind, beta=0.5, temperature=1.0, hard_weight=0.0, ignore_index=-100,
            reduction="mean", bias=None, teacher_bias=None):
    """Forward KL(p_t || p_s), reverse KL(p_s || p_t), or beta KL(p_t || m) + (1 - beta) KL(p_s || m) with
    m = beta p_t + (1 - beta) p_s, written in probability space."""
    s, u = _logits(h, w, bias), _logits(th, tw, teacher_bias).detach()
    lead, v = s.shape[:-1], s.shape[-1]
    s, u = s.reshape(-1, v), u.reshape(-1, v)
    log_s, log_t = (s / temperature).log_softmax(-1), (u / temperature).log_softmax(-1)
    p_s, p_t = log_s.exp(), log_t.exp()
    if kind == "forward_kl":
        soft = (p_t * (log_t - log_s)).sum(-1)
    elif kind == "reverse_kl":
        soft = (p_s * (log_s - log_t)).sum(-1)
    else:
        log_m = (beta * p_t + (1 - beta) * p_s).log()
        soft = beta * (p_t * (log_t - log_m)).sum(-1) + (1 - beta) * (p_s * (log_s - log_m)).sum(-1)
    loss = soft
    if hard_weight:
        hard = F.cross_entropy(s, t.reshape(-1), ignore_index=ignore_index, reduction="none")
        loss = (1 - hard_weight) * soft + hard_weight * hard
    kept = torch.ones(s.shape[0], dtype=torch.bool) if t is None else t.reshape(-1) != ignore_index
    loss = torch.where(kept, loss, 0.0)
    if reduction == "none":
        return loss.reshape(lead)
    return loss.sum() if reduction == "sum" else loss.sum() / kept.sum()


def _kind(beta):
    """Liger's ``jsd_beta`` and TRL's ``beta`` -> ours. Both special-case the ends: beta = 0 is KL(teacher || student)
    (their "FKL"), beta = 1 is KL(student || teacher); in between both weight the teacher by beta in the mixture,
    m = beta p_t + (1 - beta) p_s, and the loss is beta KL(p_t || m) + (1 - beta) KL(p_s || m): our ``beta``, same
    meaning. Ours does not special-case the ends: kind="jsd" at beta 0 or 1 is 0 (test_jsd_ends_are_zero_not_kl)."""
    if beta == 0.0:
        return dict(kind="forward_kl")
    if beta == 1.0:
        return dict(kind="reverse_kl")
    return dict(kind="jsd", beta=beta)


def _ignore_some(targets, ignore_index, g):
    """Liger's grids: a random count in [1, N/2) of the targets set to ignore_index."""
    flat = targets.view(-1)
    count = int(torch.randint(1, max(flat.numel() // 2, 2), (1,), generator=g))
    flat[torch.randperm(flat.numel(), generator=g)[:count]] = ignore_index
    return targets


def _kw_id(kw):
    return ",".join(f"{k}={v}" for k, v in kw.items()) or "default"


# ---------------------------------------------------------------------------------------------------------------
# PyTorch 2.13 F.linear_cross_entropy
#
# Mapping: F.linear_cross_entropy(input, linear_weight, target, linear_bias=b, weight=w, reduction=r,
#   ignore_index=i, label_smoothing=s, options=LinearCrossEntropyOptions(batch_chunk_size=k))
#   == linear_cross_entropy(input, linear_weight, target, bias=b, class_weight=w, reduction=r,
#   ignore_index=-100 if i is None else i, label_smoothing=s, options=FusedOptions(chunk_size=k)).
# The same unbatched convention: input (D,) with a 0-dim target gives a 0-dim loss, also with "none".
# Differences on purpose:
# - bf16/fp16 inputs: torch returns the loss in the input dtype; ours computes and returns it in fp32 (gradients
#   keep each input's dtype).
# - class-probability targets (float, (N, C)) are refused: they are an (N, V) input (test_torch_probability_...).
# - a K-dimensional linear_weight (C, *out_features, D), logits (N, C, *out_features), is not our layout (the
#   vocabulary is the weight's first dim and the logits' last): it maps to one call per out-feature position with
#   weight[:, k], targets[:, k], bias[:, k], reduced over positions by the caller (_k_dim_loss).
# ---------------------------------------------------------------------------------------------------------------

# torch.testing's default tolerances per dtype, which the OpInfo tests use
_TORCH_TOL = {F64: dict(atol=1e-7, rtol=1e-7), F32: dict(atol=1e-5, rtol=1.3e-6),
              BF16: dict(atol=1e-5, rtol=1.6e-2), F16: dict(atol=1e-5, rtol=1e-3)}
# the OpInfo's unchunked kwargs list; options: its chunked variants (batch_chunk_size 2 and 3) -> chunk_size=3
_OPINFO_KW = [{}, {"reduction": "sum"}, {"reduction": "none"},
              *({"class_weight": True, "reduction": r} for r in ("mean", "sum", "none")),
              {"ignore_index": 1}, {"bias": True}, {"bias": True, "class_weight": True, "reduction": "sum"}]


def _check_dtypes(got, dtype, shape):
    assert got[0].dtype == _wide(dtype) and got[0].shape == shape  # the loss in fp32 for bf16/fp16 inputs
    assert all(g is None or g.dtype == dtype for g in got[1:])


@pytest.mark.parametrize("dtype", [F64, F32, BF16, F16], ids=str)
@pytest.mark.parametrize("kw", _OPINFO_KW, ids=_kw_id)
@pytest.mark.parametrize("batch", [(), (8,)], ids=["unbatched", "N=8"])  # sample_inputs_linear's [] and [8]
@pytest.mark.parametrize("d_v", [(3, 4), (8, 8)], ids=["D=3,V=4", "D=8,V=8"])  # its (in, out) features
def test_torch_opinfo_samples(d_v, batch, kw, dtype):
    # Skipped from the grid: batch [0] (degenerate, skipped by torch too), [2, 3] and the 5-D input (they become
    # K-dimensional samples there: see test_torch_module_inputs), probability targets (refused here).
    d, v = d_v
    g = _gen("opinfo", d_v, batch, kw, str(dtype))

    def uniform(*shape):  # make_tensor(low=-2, high=2)
        return torch.rand(*shape, generator=g) * 4 - 2

    hidden, weight = uniform(*batch, d).to(dtype), uniform(v, d).to(dtype)
    bias = uniform(v).to(dtype) if kw.get("bias") else None
    class_weight = (torch.rand(v, generator=g) * 1.5 + 0.5).to(dtype) if kw.get("class_weight") else None
    targets = torch.randint(0, v, batch, generator=g)
    ignore_index = kw.get("ignore_index", -100)
    if (targets == ignore_index).all():  # as torch: at least one kept target, so that "mean" is defined
        targets.view(-1)[0] = (ignore_index + 1) % v
    reduction = kw.get("reduction", "mean")
    upstream = torch.randn(batch, generator=g, dtype=F64) if reduction == "none" else None
    common = dict(class_weight=class_weight, ignore_index=ignore_index, reduction=reduction)

    def fused(h, w, b):
        return linear_cross_entropy(h, w, targets, bias=b, options=FusedOptions(chunk_size=3), **common)

    def unfused(h, w, b):
        return _ce_ref(h, w, targets, b, **common)

    gold = _run(unfused, F64, (hidden, weight, bias), upstream=upstream)
    got = _run(fused, dtype, (hidden, weight, bias), upstream=upstream)
    _check_dtypes(got, dtype, targets.shape if reduction == "none" else ())
    if dtype in (F64, F32):
        _close(got, gold, **_TORCH_TOL[dtype])
    else:
        _no_worse(got, _run(unfused, dtype, (hidden, weight, bias), upstream=upstream), gold, **_TORCH_TOL[dtype])


def _module_cases():
    """module_inputs_torch_nn_LinearCrossEntropyLoss's grid: (N, D, V) in {(8, 5, 4), unbatched (8, 4)}, every
    reduction x ignore_index in {None, -100, (V - 1) // 2, V + 5 (out of range)} x label_smoothing {0, 0.1} x class
    weights {None, exp(randn)} x out_features {(), (3, 2, 4)} (K-dim, batched only); ignore_index with "sum" is
    skipped there too. Targets: random; with half the rows' target set to ignore_index (batched); all ignored
    (reduction "none")."""
    for n, d, v in ((8, 5, 4), (None, 8, 4)):
        for reduction, ii, ls, cw, of in itertools.product(("sum", "mean", "none"), (None, -100, (v - 1) // 2, v + 5),
                                                          (0.0, 0.1), (False, True), ((), (3, 2, 4))):
            if (n is None and of) or (ii is not None and reduction == "sum"):
                continue
            base = (n, d, v, reduction, ii, ls, cw, of)
            yield (*base, "random")
            if n is not None and ii is not None:
                yield (*base, "half")
            if reduction == "none" and ii is not None:
                yield (*base, "all")


def _k_dim_loss(module, hidden, weight, targets, bias, reduction, class_weight, ignore_index):
    """A K-dim sample through our 2-D API: one call per out-feature position (module has reduction="none")."""
    out_features = weight.shape[1:-1]
    per_position = []
    for k in itertools.product(*(range(s) for s in out_features)):
        idx = (slice(None), *k)
        per_position.append(module(hidden, weight[idx], targets[idx], None if bias is None else bias[idx]))
    losses = torch.stack(per_position, -1).reshape(targets.shape)
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    kept = targets != ignore_index  # "mean": over kept targets, weighted by their class weights, as F.cross_entropy
    denom = kept.sum() if class_weight is None else (class_weight[targets.clamp(0, len(class_weight) - 1)] * kept).sum()
    return losses.sum() / denom


@pytest.mark.parametrize("case", list(_module_cases()), ids=str)
def test_torch_module_inputs(case):
    n, d, v, reduction, ii, ls, cw, of, fill = case
    g = _gen("module", case)
    batch = () if n is None else (n,)
    hidden = torch.randn(*batch, d, generator=g)
    weight = torch.randn(v, *of, d, generator=g) / d ** 0.5
    class_weight = torch.randn(v, generator=g).exp() if cw else None
    targets = torch.randint(0, v, (*batch, *of), generator=g)
    if fill == "half":
        targets[n // 2] = ii
    elif fill == "all":
        targets = torch.full_like(targets, ii)
    ignore_index = -100 if ii is None else ii  # torch's None -> -100
    if reduction == "mean" and fill == "random" and (targets == ignore_index).all():
        targets.view(-1)[0] = (ignore_index + 1) % v  # torch's "valid normalization" fix
    upstream = torch.randn(targets.shape, generator=g, dtype=F64) if reduction == "none" else None

    def unfused(h, w):  # torch's reference: the K-dim logits (N, C, *out_features), then F.cross_entropy
        z = F.linear(h, w.reshape(-1, d)).reshape(*batch, v, *of)
        cw_ = None if class_weight is None else class_weight.to(z.dtype)
        return F.cross_entropy(z, targets, weight=cw_, ignore_index=ignore_index, label_smoothing=ls,
                               reduction=reduction)

    def fused(h, w):
        kw = dict(class_weight=class_weight, ignore_index=ignore_index, label_smoothing=ls,
                  options=FusedOptions(chunk_size=3))
        if not of:
            return LinearCrossEntropyLoss(reduction=reduction, **kw)(h, w, targets)
        module = LinearCrossEntropyLoss(reduction="none", **kw)
        return _k_dim_loss(module, h, w, targets, None, reduction, class_weight, ignore_index)

    gold = _run(unfused, F64, (hidden, weight), upstream=upstream)
    got = _run(fused, F32, (hidden, weight), upstream=upstream)
    assert got[0].shape == gold[0].shape
    _close(got, gold, **_TORCH_TOL[F32])


@pytest.mark.parametrize("batch, of", [((), ()), ((8,), ()), ((8,), (3, 2, 4))], ids=["unbatched", "N=8", "K-dim"])
def test_torch_module_bias(batch, of):
    # the module grid's bias=True samples: "mean", no class weights, default ignore_index, chunked (batch_chunk_size=2)
    d, v = (5, 4) if batch else (8, 4)
    g = _gen("module_bias", batch, of)
    hidden, weight = torch.randn(*batch, d, generator=g), torch.randn(v, *of, d, generator=g) / d ** 0.5
    bias = torch.randn(v, *of, generator=g)
    targets = torch.randint(0, v, (*batch, *of), generator=g)

    def unfused(h, w, b):
        z = F.linear(h, w.reshape(-1, d), b.reshape(-1)).reshape(*batch, v, *of)
        return F.cross_entropy(z, targets)

    def fused(h, w, b):
        if not of:
            return LinearCrossEntropyLoss(options=FusedOptions(chunk_size=2))(h, w, targets, b)
        module = LinearCrossEntropyLoss(reduction="none", options=FusedOptions(chunk_size=2))
        return _k_dim_loss(module, h, w, targets, b, "mean", None, -100)

    _close(_run(fused, F32, (hidden, weight, bias)), _run(unfused, F64, (hidden, weight, bias)), **_TORCH_TOL[F32])


def test_torch_all_targets_ignored():
    # test/nn/test_linear_cross_entropy.py: N=512, D=16, V=128, a bias, every target = ignore_index = -1, chunked
    # over the batch: "mean" is NaN (0/0, as F.cross_entropy), "sum" 0, "none" zeros; here also: zero gradients.
    g = _gen("all_ignored")
    hidden, weight, bias = torch.randn(512, 16, generator=g), torch.randn(128, 16, generator=g), torch.randn(128,
                                                                                                           generator=g)
    targets = torch.full((512,), -1)
    for reduction in ("mean", "sum", "none"):
        def fused(h, w, b):
            return linear_cross_entropy(h, w, targets, bias=b, ignore_index=-1, reduction=reduction,
                                        options=FusedOptions(chunk_size=64))

        got = _run(fused, F32, (hidden, weight, bias))
        gold = _run(lambda h, w, b: _ce_ref(h, w, targets, b, ignore_index=-1, reduction=reduction), F64,
                    (hidden, weight, bias))
        assert torch.isnan(got[0]) if reduction == "mean" else not got[0].any()
        _close(got, gold, atol=0, rtol=0)  # exact zeros (and NaN where torch has NaN)


def test_torch_gradcheck():
    # test/nn/test_linear_cross_entropy.py: gradcheck in fp64, N=3, D=5, V=20, with a bias, chunked over the vocab
    # there; chunked over tokens here (chunk_size=2, a ragged last chunk).
    g = _gen("gradcheck")
    hidden, weight = torch.randn(3, 5, generator=g, dtype=F64), torch.randn(20, 5, generator=g, dtype=F64)
    bias, targets = torch.randn(20, generator=g, dtype=F64), torch.randint(0, 20, (3,), generator=g)
    leaves = [t.requires_grad_() for t in (hidden, weight, bias)]
    assert torch.autograd.gradcheck(
        lambda h, w, b: linear_cross_entropy(h, w, targets, bias=b, options=FusedOptions(chunk_size=2)), leaves)


@pytest.mark.parametrize("kw", [{"reduction": "invalid"}, {"label_smoothing": -0.1}, {"label_smoothing": 1.1}],
                         ids=_kw_id)
def test_torch_parameter_validation(kw):
    # test/nn/test_linear_cross_entropy.py: ValueError naming the argument (x (2, 4), W (8, 4), t (2,))
    name = next(iter(kw))
    with pytest.raises(ValueError, match=name):
        linear_cross_entropy(torch.randn(2, 4), torch.randn(8, 4), torch.randint(0, 8, (2,)), **kw)


def test_torch_probability_targets_refused():
    # torch's OpInfo and module grids also take class-probability targets ((N, C) floats). Ours refuses them on
    # purpose (an (N, V) input is what the fused loss exists to avoid), with a ValueError naming targets.
    with pytest.raises(ValueError, match="targets"):
        linear_cross_entropy(torch.randn(8, 5), torch.randn(4, 5), torch.rand(8, 4))


def test_unbatched_token_every_per_token_output():
    # torch's unbatched convention (input (D,), 0-dim target: a 0-dim loss, also with "none"; the OpInfo's batch
    # [] samples) holds for every per-token output of ours: cross-entropy "none", the log-probs and their entropy,
    # distillation "none". TRL's entropy grid has the same single-row case (test_trl_entropy_from_logits, (768,)).
    g = _gen("unbatched")
    d, v = 8, 11
    hidden, weight = torch.randn(d, generator=g), torch.randn(v, d, generator=g) / d ** 0.5
    teacher_hidden, teacher_weight = torch.randn(d + 4, generator=g), torch.randn(v, d + 4, generator=g)
    target = torch.tensor(3)
    ups = torch.randn(2, generator=g, dtype=F64)

    def ce(h, w, fused):
        if fused:
            return linear_cross_entropy(h, w, target, reduction="none")
        return _ce_ref(h, w, target, reduction="none")

    def logprobs(h, w, fused):
        lp, ent = (linear_token_logprobs(h, w, target, return_entropy=True) if fused
                   else _logprob_ref(h, w, target))
        assert lp.shape == ent.shape == ()
        return lp, lp.double() * ups[0] + ent.double() * ups[1]

    def kd(h, w, fused):
        fn = linear_kd_loss if fused else _kd_ref
        return fn(h, w, teacher_hidden.to(h.dtype), teacher_weight.to(h.dtype), target, kind="jsd", beta=0.3,
                  reduction="none")

    for fn in (ce, logprobs, kd):
        gold = _run(lambda h, w: fn(h, w, False), F64, (hidden, weight))
        got = _run(lambda h, w: fn(h, w, True), F32, (hidden, weight))
        assert got[0].shape == (), fn.__name__
        _close(got, gold, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Liger Kernel: fused linear cross-entropy
#
# Mapping: LigerFusedLinearCrossEntropyLoss(ce_weight=c, ignore_index=i, lse_square_scale=z, label_smoothing=s,
#   reduction=r, softcap=cap, return_z_loss=True)(lin.weight, x, y, lin.bias)
#   == linear_cross_entropy(x, lin.weight, y, bias=lin.bias, class_weight=c, ignore_index=i, z_loss=z,
#   label_smoothing=s, reduction=r, softcap=cap, return_aux=AuxRequest(lse=True)); their z_loss output is
#   z * sum(lse^2 over kept) (divided by the kept count for "mean"), which we rebuild from AuxOutput.lse.
#   return_token_accuracy -> AuxRequest(correct=True), the accuracy being the mean of `correct` over kept tokens;
#   accum_dtype and the chunk sizes are engine knobs with no counterpart (our chunk: FusedOptions(chunk_size)).
# Same conventions: the z-loss is a mean over kept tokens whatever the class weights (their CrossEntropyWithZLoss);
# the hidden is (B*T, H); weight = rand(V, H) (all positive) and bias = rand(V).
# Cut: their (8, 128, 1024, 4096) shape becomes (2, 64, 128, 1024) (its point is a realistic size, which here only
# buys time); the (4, 47, 31, 123) "random shape" is kept as it is.
# ---------------------------------------------------------------------------------------------------------------

_LIGER_CE_SHAPES = [(4, 47, 31, 123), (2, 64, 128, 1024)]
_LIGER_CE_RED = [("mean", BF16, 5e-3, 5e-2), ("mean", F32, 1e-5, 5e-4), ("sum", BF16, 5.0, 50.0),
                 ("sum", F32, 1e-3, 5e-2)]
# their two option sets: defaults, and every non-default at once
_LIGER_CE_OPTS = [dict(), dict(class_weight=True, label_smoothing=0.1, ignore_index=42, z_loss=1e-4, softcap=30.0)]


def _compare(got, gold, dtype, atol, rtol, unfused=None):
    """fp32: the peer's tolerance against fp64; bf16/fp16: no worse than the unfused code plus that tolerance."""
    if dtype in (F32, F64):
        _close(got, gold, atol, rtol)
    else:
        _no_worse(got, unfused(), gold, atol, rtol)


@pytest.mark.parametrize("opts", _LIGER_CE_OPTS, ids=["defaults", "all_options"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("red", _LIGER_CE_RED, ids=lambda r: f"{r[0]}-{r[1]}")
@pytest.mark.parametrize("shape", _LIGER_CE_SHAPES, ids=str)
def test_liger_flce(shape, red, bias, opts):
    b_, t_, h_, v = shape
    reduction, dtype, atol, rtol = red
    g = _gen("liger_flce", shape, reduction, str(dtype), bias, bool(opts))
    hidden = torch.randn(b_ * t_, h_, generator=g).to(dtype)
    weight = torch.rand(v, h_, generator=g).to(dtype)
    b = torch.rand(v, generator=g).to(dtype) if bias else None
    kw = dict(opts, class_weight=torch.rand(v, generator=g)) if opts else {}  # ce_weight: rand(V), fp32
    ignore_index = kw.get("ignore_index", -100)
    targets = _ignore_some(torch.randint(0, v, (b_ * t_,), generator=g), ignore_index, g)
    box = {}

    def fused(h, w, b):
        loss, box["aux"] = linear_cross_entropy(h, w, targets, bias=b, reduction=reduction,
                                                return_aux=AuxRequest(lse=True), options=FusedOptions(chunk_size=64),
                                                **kw)
        return loss

    def unfused(h, w, b):
        return _ce_ref(h, w, targets, b, reduction=reduction, **kw)

    gold = _run(unfused, F64, (hidden, weight, b))
    got = _run(fused, dtype, (hidden, weight, b))
    _check_dtypes(got, dtype, ())
    _compare(got, gold, dtype, atol, rtol, lambda: _run(unfused, dtype, (hidden, weight, b)))
    if kw.get("z_loss"):  # their return_z_loss output
        kept = targets != ignore_index
        z = _logits(hidden.double(), weight.double(), None if b is None else b.double())
        z = kw["softcap"] * torch.tanh(z / kw["softcap"])
        want = kw["z_loss"] * (z.logsumexp(-1).square() * kept).sum()
        got_z = kw["z_loss"] * (box["aux"].lse.double().square() * kept).sum()
        if reduction == "mean":
            want, got_z = want / kept.sum(), got_z / kept.sum()
        torch.testing.assert_close(got_z, want, atol=atol, rtol=rtol)


@pytest.mark.parametrize("class_weight", [True, False], ids=["ce_weight", "no_ce_weight"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("dtype_tol", [(BF16, 5e-3, 5e-2), (F32, 1e-5, 5e-4)], ids=lambda t: str(t[0]))
@pytest.mark.parametrize("shape", [(2, 2, 8, 8), (9, 7, 41, 41)], ids=str)
def test_liger_flce_functional(shape, dtype_tol, bias, class_weight):
    # their test_correctness_functional: weight, bias and ce_weight randn (class weights of either sign: "mean"
    # divides by their sum, as F.cross_entropy), ls 0.1, z 1e-4, softcap 30, "mean", a random scalar upstream.
    b_, t_, h_, v = shape
    dtype, atol, rtol = dtype_tol
    g = _gen("liger_flce_functional", shape, str(dtype), bias, class_weight)
    hidden, weight = torch.randn(b_ * t_, h_, generator=g).to(dtype), torch.randn(v, h_, generator=g).to(dtype)
    b = torch.randn(v, generator=g).to(dtype) if bias else None
    kw = dict(class_weight=torch.randn(v, generator=g) if class_weight else None, label_smoothing=0.1, z_loss=1e-4,
              softcap=30.0)
    targets = torch.randint(0, v, (b_ * t_,), generator=g)
    upstream = torch.randn((), generator=g, dtype=F64)

    def unfused(h, w, b):
        return _ce_ref(h, w, targets, b, **kw)

    gold = _run(unfused, F64, (hidden, weight, b), upstream=upstream)
    got = _run(lambda h, w, b: linear_cross_entropy(h, w, targets, bias=b, options=FusedOptions(chunk_size=16), **kw),
               dtype, (hidden, weight, b), upstream=upstream)
    _compare(got, gold, dtype, atol, rtol, lambda: _run(unfused, dtype, (hidden, weight, b), upstream=upstream))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("shape", [(2, 16, 32, 64), (1, 32, 64, 128)], ids=str)
def test_liger_flce_none_per_token_upstream(shape, bias):
    # their regression test: "none" with a non-uniform upstream rand + 0.5; inputs randn * 0.1; fp32, 1e-4
    b_, t_, h_, v = shape
    g = _gen("liger_none", shape, bias)
    hidden, weight = torch.randn(b_ * t_, h_, generator=g) * 0.1, torch.randn(v, h_, generator=g) * 0.1
    b = torch.randn(v, generator=g) * 0.1 if bias else None
    targets = torch.randint(0, v, (b_ * t_,), generator=g)
    upstream = torch.rand(b_ * t_, generator=g, dtype=F64) + 0.5
    gold = _run(lambda h, w, b: _ce_ref(h, w, targets, b, reduction="none"), F64, (hidden, weight, b),
                upstream=upstream)
    got = _run(lambda h, w, b: linear_cross_entropy(h, w, targets, bias=b, reduction="none",
                                                    options=FusedOptions(chunk_size=8)),
               F32, (hidden, weight, b), upstream=upstream)
    _close(got, gold, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("ignore_index", [-100, 2])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("shape", _LIGER_CE_SHAPES, ids=str)
def test_liger_flce_token_accuracy(shape, bias, ignore_index):
    # return_token_accuracy / return_predicted_tokens -> AuxRequest(correct=True): argmax == target on kept tokens,
    # False on ignored ones (Liger: predicted token -1 there). fp32 only: their bf16 variant compares logit values
    # because chunked bf16 matmuls break near-ties differently; rows whose top-2 fp64 logits are within 1e-4 are
    # left out here for the same reason.
    b_, t_, h_, v = shape
    g = _gen("liger_acc", shape, bias, ignore_index)
    hidden, weight = torch.randn(b_ * t_, h_, generator=g), torch.randn(v, h_, generator=g)
    b = torch.randn(v, generator=g) if bias else None
    targets = torch.randint(0, v, (b_ * t_,), generator=g)
    targets[torch.randperm(b_ * t_, generator=g)[: b_ * t_ // 4]] = ignore_index
    with torch.no_grad():
        z = _logits(hidden.double(), weight.double(), None if b is None else b.double())
    targets[:8] = torch.where(targets[:8] == ignore_index, ignore_index, z[:8].argmax(-1))  # some correct ones
    loss, aux = linear_cross_entropy(hidden, weight, targets, bias=b, ignore_index=ignore_index,
                                     return_aux=AuxRequest(correct=True), options=FusedOptions(chunk_size=64))
    kept = targets != ignore_index
    top2 = z.topk(2, -1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-4
    want = (z.argmax(-1) == targets) & kept
    assert torch.equal(aux.correct[clear], want[clear]) and not aux.correct[~kept].any()
    accuracy = aux.correct[kept & clear].double().mean()
    torch.testing.assert_close(accuracy, want[kept & clear].double().mean(), atol=1e-5, rtol=5e-4)
    torch.testing.assert_close(loss.double(), _ce_ref(hidden.double(), weight.double(), targets,
                                                      None if b is None else b.double(), ignore_index=ignore_index),
                               atol=1e-5, rtol=5e-4)


@pytest.mark.parametrize("cast", [BF16, F16], ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_liger_flce_amp(bias, cast):
    # their test_amp on the (4, 47, 31, 123) shape: fp32 parameters, forward + backward under autocast; compared
    # with the unfused code under the same autocast, against fp64 without it; their tolerance 5e-3 / 5e-2.
    b_, t_, h_, v = 4, 47, 31, 123
    g = _gen("liger_amp", bias, str(cast))
    hidden, weight = torch.randn(b_ * t_, h_, generator=g), torch.rand(v, h_, generator=g)
    b = torch.rand(v, generator=g) if bias else None
    targets = torch.randint(0, v, (b_ * t_,), generator=g)

    def under_autocast(fn):
        def run(h, w, b):
            with torch.autocast("cpu", dtype=cast):
                return fn(h, w, b)
        return run

    gold = _run(lambda h, w, b: _ce_ref(h, w, targets, b), F64, (hidden, weight, b))
    ref = _run(under_autocast(lambda h, w, b: _ce_ref(h, w, targets, b)), F32, (hidden, weight, b))
    got = _run(under_autocast(lambda h, w, b: linear_cross_entropy(h, w, targets, bias=b,
                                                                   options=FusedOptions(chunk_size=64))),
               F32, (hidden, weight, b))
    assert all(t is None or t.dtype == F32 for t in got)  # gradients in each input's dtype (fp32 parameters)
    _no_worse(got, ref, gold, atol=5e-3, rtol=5e-2)


# ---------------------------------------------------------------------------------------------------------------
# Liger Kernel: fused linear JSD (test/transformers/test_fused_linear_jsd.py)
#
# Mapping: LigerFusedLinearJSD(jsd_beta=beta, ignore_index=i, temperature=T)(x_s, W_s, x_t, W_t, label)
#   == linear_kd_loss(x_s, W_s, x_t, W_t, label, ignore_index=i, temperature=T, **_kind(beta)): the mean over
#   kept tokens (all tokens without a label), both logits divided by T, no T^2.
# Their inputs: student hidden H // 2, teacher H; weights rand(V, .) and hidden rand(BT, .) * scalar (all positive).
# Difference on purpose: with every label ignored Liger returns 0; ours gives NaN for the mean (0/0, as
# F.cross_entropy) and zero gradients (test_liger_fljsd_all_ignored).
# Cut: (8, 128, 1024, 4096) becomes (2, 64, 256, 1024); their odd (4, 423, 167, 1423) shape is kept.
# ---------------------------------------------------------------------------------------------------------------

_FLJSD_SHAPES = [(4, 423, 167, 1423), (2, 64, 256, 1024)]
_FLJSD_DTYPES = [(BF16, 5e-3, 5e-2), (F32, 1e-5, 5e-4)]
# (temperature, beta, ignore_index for the labelled variant): their two lists, beta 0 = FKL, beta 1 = RKL
_FLJSD_PARAMS = [(1.0, 0.5, 2), (2.0, 0.1, 42), (1.0, 0.0, 2), (1.0, 1.0, 2)]


def _jsd_inputs(shape, dtype, scalar, g, bias=False):
    b_, t_, h_, v = shape
    n = b_ * t_
    x_s = (torch.rand(n, h_ // 2, generator=g) * scalar).to(dtype)
    w_s = torch.rand(v, h_ // 2, generator=g).to(dtype)
    x_t = (torch.rand(n, h_, generator=g) * scalar).to(dtype)
    w_t = torch.rand(v, h_, generator=g).to(dtype)
    biases = (torch.rand(v, generator=g).to(dtype), torch.rand(v, generator=g).to(dtype)) if bias else (None, None)
    return x_s, w_s, x_t, w_t, biases


def _kd_case(x_s, w_s, x_t, w_t, labels, dtype, atol, rtol, bias=(None, None), chunk=64, **kw):
    def fused(h, w, b, th, tw, tb):
        return linear_kd_loss(h, w, th, tw, labels, bias=b, teacher_bias=tb, options=FusedOptions(chunk_size=chunk),
                              **kw)

    def unfused(h, w, b, th, tw, tb):
        return _kd_ref(h, w, th, tw, labels, bias=b, teacher_bias=tb, **kw)

    data = (x_t, w_t, bias[1])
    diff = (x_s, w_s, bias[0])
    gold = _run(unfused, F64, diff, data)
    got = _run(fused, dtype, diff, data)
    assert got[0].dtype == F32
    _compare(got, gold, dtype, atol, rtol, lambda: _run(unfused, dtype, diff, data))


@pytest.mark.parametrize("labelled", [False, True], ids=["no_label", "ignore_index"])
@pytest.mark.parametrize("params", _FLJSD_PARAMS, ids=lambda p: f"T={p[0]},beta={p[1]}")
@pytest.mark.parametrize("dtype_tol", _FLJSD_DTYPES, ids=lambda t: str(t[0]))
@pytest.mark.parametrize("shape", _FLJSD_SHAPES, ids=str)
def test_liger_fljsd(shape, dtype_tol, params, labelled):
    temperature, beta, ignore_index = params
    dtype, atol, rtol = dtype_tol
    g = _gen("liger_fljsd", shape, str(dtype), params, labelled)
    x_s, w_s, x_t, w_t, _ = _jsd_inputs(shape, dtype, 1.0, g)
    labels = None
    if labelled:
        labels = _ignore_some(torch.randint(0, shape[3], (x_s.shape[0],), generator=g), ignore_index, g)
    _kd_case(x_s, w_s, x_t, w_t, labels, dtype, atol, rtol, temperature=temperature, ignore_index=ignore_index,
             **_kind(beta))


@pytest.mark.parametrize("params", [(1.0, 0.5, -100), (2.0, 0.1, 42)], ids=lambda p: f"T={p[0]},beta={p[1]}")
@pytest.mark.parametrize("dtype_tol", _FLJSD_DTYPES, ids=lambda t: str(t[0]))
@pytest.mark.parametrize("shape", [(2, 2, 8, 8), (9, 7, 41, 41)], ids=str)
def test_liger_fljsd_functional(shape, dtype_tol, params):
    # their functional grid: scalar 0.5, labels with a random count ignored (ignore_index 42 > V: out of range)
    temperature, beta, ignore_index = params
    dtype, atol, rtol = dtype_tol
    g = _gen("liger_fljsd_functional", shape, str(dtype), params)
    x_s, w_s, x_t, w_t, _ = _jsd_inputs(shape, dtype, 0.5, g)
    labels = _ignore_some(torch.randint(0, shape[3], (x_s.shape[0],), generator=g), ignore_index, g)
    _kd_case(x_s, w_s, x_t, w_t, labels, dtype, atol, rtol, chunk=5, temperature=temperature,
             ignore_index=ignore_index, **_kind(beta))


def test_liger_fljsd_all_ignored():
    # their test_correctness_all_ignored (T=1, beta=0.5, ignore_index=2) on (4, 423, 167, 1423): Liger returns 0 and
    # zero gradients; ours NaN (the mean over no kept token, as F.cross_entropy) and zero gradients, on purpose.
    g = _gen("liger_fljsd_all_ignored")
    x_s, w_s, x_t, w_t, _ = _jsd_inputs((4, 423, 167, 1423), F32, 1.0, g)
    labels = torch.full((x_s.shape[0],), 2)
    got = _run(lambda h, w: linear_kd_loss(h, w, x_t, w_t, labels, kind="jsd", beta=0.5, ignore_index=2,
                                           options=FusedOptions(chunk_size=64)), F32, (x_s, w_s))
    assert torch.isnan(got[0]) and not got[1].any() and not got[2].any()


# ---------------------------------------------------------------------------------------------------------------
# Liger Kernel: chunked JSD distillation loss (test/chunked_loss/test_jsd_loss.py)
#
# Mapping: LigerFusedLinearJSDLoss(weight_hard_loss=a, weight_soft_loss=1 - a, beta=beta, temperature=T,
#   ignore_index=i)(x_s, W_s, x_t, W_t, y, b_s, b_t)
#   == linear_kd_loss(x_s, W_s, x_t, W_t, y, bias=b_s, teacher_bias=b_t, hard_weight=a, temperature=T,
#   ignore_index=i, **_kind(beta)): every grid point has weight_hard + weight_soft = 1; their loss
#   a * CE(kept mean, at T = 1) + (1 - a) * JSD(kept mean, at T) is our per-token mix averaged over kept tokens.
# Cut: (8, 128, 1024, 4096) becomes (2, 64, 256, 1024), fp32 only, one ignore_index; (3, 47, 31, 123) full grid.
# ---------------------------------------------------------------------------------------------------------------

_CHUNKED_JSD_PARAMS = [(1.0, 0.5, 0.5, 0.5), (2.0, 0.0, 1.0, 0.8), (0.5, 1.0, 0.0, 0.2)]  # T, w_hard, w_soft, beta


def _chunked_jsd_cases():
    for dtype_tol, bias, params, ii in itertools.product([(BF16, 5e-2, 5e-1), (F32, 1e-5, 5e-4)], (True, False),
                                                         _CHUNKED_JSD_PARAMS, (-100, 42)):
        yield (3, 47, 31, 123), dtype_tol, bias, params, ii
    for params in _CHUNKED_JSD_PARAMS:
        yield (2, 64, 256, 1024), (F32, 1e-5, 5e-4), True, params, -100


@pytest.mark.parametrize("case", list(_chunked_jsd_cases()), ids=str)
def test_liger_chunked_jsd(case):
    shape, (dtype, atol, rtol), bias, (temperature, w_hard, w_soft, beta), ignore_index = case
    assert w_hard + w_soft == 1.0
    g = _gen("liger_chunked_jsd", case)
    x_s, w_s, x_t, w_t, biases = _jsd_inputs(shape, dtype, 1.0, g, bias)
    labels = _ignore_some(torch.randint(0, shape[3], (x_s.shape[0],), generator=g), ignore_index, g)
    _kd_case(x_s, w_s, x_t, w_t, labels, dtype, atol, rtol, bias=biases, temperature=temperature,
             hard_weight=w_hard, ignore_index=ignore_index, **_kind(beta))


@pytest.mark.parametrize("params", [(1.0, 0.5, 0.5, 0.5, -100), (2.0, 0.1, 0.9, 0.5, 42)], ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("dtype_tol", [(BF16, 5e-2, 5e-2), (F32, 1e-4, 5e-3)], ids=lambda t: str(t[0]))
@pytest.mark.parametrize("shape", [(2, 2, 8, 8), (9, 7, 41, 41)], ids=str)
def test_liger_chunked_jsd_functional(shape, dtype_tol, bias, params):
    temperature, w_hard, w_soft, beta, ignore_index = params
    dtype, atol, rtol = dtype_tol
    g = _gen("liger_chunked_jsd_functional", shape, str(dtype), bias, params)
    x_s, w_s, x_t, w_t, biases = _jsd_inputs(shape, dtype, 1.0, g, bias)
    labels = _ignore_some(torch.randint(0, shape[3], (x_s.shape[0],), generator=g), ignore_index, g)
    _kd_case(x_s, w_s, x_t, w_t, labels, dtype, atol, rtol, bias=biases, chunk=5, temperature=temperature,
             hard_weight=w_hard, ignore_index=ignore_index, **_kind(beta))


# ---------------------------------------------------------------------------------------------------------------
# Liger Kernel: chunked GRPO (test/chunked_loss/test_grpo_loss.py)
#
# Mapping: LigerFusedLinearGRPOLoss(beta, epsilon_low, epsilon_high, temperature, loss_type, max_completion_length,
#   importance_sampling_level)(x, lin.weight, ids, attention_mask, advantages, lin.bias, ref_per_token_logps,
#   old_per_token_logps, ref_input, ref_lin.weight, ref_lin.bias)
#   == linear_grpo_loss(x, lin.weight, ids, attention_mask, advantages, bias=lin.bias, old_logprobs=old,
#   ref_logprobs=ref, beta=..., same names): their metrics [kl (if beta), clip ratio] -> AuxOutput.stats
#   ["kl"], ["clip_ratio"]. A reference head (use_ref_model with ref_input) is data to us: its log-probs are
#   computed here (unfused, fp64) and passed as ref_logprobs; use_ref_model=False means ref = the current
#   log-probs, detached (a zero KL with zero gradient), passed the same way. "dapo" normalizes by the kept tokens of
#   the call (Liger: of the step, across processes; the same on one process without num_items_in_batch).
# Not ours: loss types cispo, sapo, luspo, vespo and the delta clamp (their delta=None points only).
# Cut: fp32 on (3, 47, 31, 123) over every (loss type, level, param set, reference mode), a bias with grpo and
# dapo; bf16
# on one param set; their (8, 128, 1024, 4096) is dropped (its point is a size), their large-sequence case
# (1, 4096, 256, 5000) becomes (1, 512, 256, 5000): still many chunks of a wide vocabulary.
# ---------------------------------------------------------------------------------------------------------------

_GRPO_PARAMS = [(0.1, 0.2, 0.2, 1.0), (0.0, 0.1, 0.1, 2.0)]  # beta, epsilon_low, epsilon_high, temperature
_GRPO_REF_MODES = [(True, True, True), (True, False, False), (False, False, True)]  # use_ref_model, ref logps, old


def _grpo_ref(logp, mask, adv, old, ref, *, beta, epsilon_low, epsilon_high, loss_type, importance_sampling_level,
              max_completion_length=None):
    """TRL's GRPOTrainer formulas (as Liger's reference writes them) on per-token log-probs (B, T)."""
    mask = mask.to(logp.dtype)
    log_ratio = logp - (logp.detach() if old is None else old)
    if importance_sampling_level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1)).unsqueeze(-1)
    ratio, a = log_ratio.exp(), adv.unsqueeze(-1)
    lower, upper = 1 - epsilon_low, 1 + epsilon_high
    per_token = -torch.minimum(ratio * a, ratio.clamp(lower, upper) * a)
    clipped = ((ratio < lower) & (a < 0)) | ((ratio > upper) & (a > 0))
    stats = {"clip_ratio": (clipped.expand_as(mask) * mask).sum() / mask.sum().clamp(min=1)}
    if beta:
        kl = (ref - logp).exp() - (ref - logp) - 1
        per_token = per_token + beta * kl
        stats["kl"] = (kl * mask).sum() / mask.sum().clamp(min=1)
    b, t = mask.shape
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    elif loss_type == "dr_grpo":
        loss = (per_token * mask).sum() / (b * (max_completion_length or t))
    else:  # bnpo, dapo
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1)
    return loss, stats


def _grpo_cases():
    for loss_type, level, params, mode in itertools.product(("bnpo", "grpo", "dr_grpo", "dapo"), ("token", "sequence"),
                                                            _GRPO_PARAMS, _GRPO_REF_MODES):
        yield (3, 47, 31, 123), (F32, 2e-5, 1e-3), loss_type in ("grpo", "dapo"), loss_type, level, params, mode
    for loss_type, level in itertools.product(("bnpo", "grpo", "dr_grpo", "dapo"), ("token", "sequence")):
        yield (3, 47, 31, 123), (BF16, 1e-1, 5e-1), True, loss_type, level, _GRPO_PARAMS[0], _GRPO_REF_MODES[0]


def _grpo_case(shape, dtype, atol, rtol, bias, loss_type, level, params, mode, g, mask=None, chunk=32):
    b_, t_, h_, v = shape
    beta, eps_low, eps_high, temperature = params
    use_ref_model, use_ref_logps, use_old = mode
    hidden = torch.randn(b_, t_, h_, generator=g).to(dtype)
    weight = torch.randn(v, h_, generator=g).to(dtype)
    b = torch.randn(v, generator=g).to(dtype) if bias else None
    ids = torch.randint(0, v, (b_, t_), generator=g)
    if mask is None:  # their random padding: a random count in [1, BT/2) of positions masked
        mask = torch.ones(b_, t_)
        count = int(torch.randint(1, b_ * t_ // 2, (1,), generator=g))
        mask.view(-1)[torch.randperm(b_ * t_, generator=g)[:count]] = 0
    adv = torch.randn(b_, generator=g)
    adv[0] = -adv[0].abs()
    adv[1:2] = adv[1:2].abs()  # mixed signs
    with torch.no_grad():
        cur = _logprob_ref(hidden.double(), weight.double(), ids, None if b is None else b.double(), temperature)[0]

    def noise():
        return torch.randn(b_, t_, generator=g, dtype=F64) * 0.01

    old = (cur + noise()).float() if use_old else None
    if use_ref_model and use_ref_logps:
        ref = (cur + noise()).float()
    elif use_ref_model:  # a reference head on ref_input = input + 0.01 noise, weight + 0.01 noise (their setup)
        ref_hidden = hidden.double() + torch.randn(b_, t_, h_, generator=g, dtype=F64) * 0.01
        ref_weight = weight.double() + torch.randn(v, h_, generator=g, dtype=F64) * 0.01
        ref_bias = None if b is None else b.double() + torch.randn(v, generator=g, dtype=F64) * 0.01
        with torch.no_grad():
            ref = _logprob_ref(ref_hidden, ref_weight, ids, ref_bias, temperature)[0].float()
    else:
        ref = cur.float()  # no reference model: the current log-probs, detached
    kw = dict(beta=beta, epsilon_low=eps_low, epsilon_high=eps_high, loss_type=loss_type,
              importance_sampling_level=level)
    max_len = t_ if loss_type == "dr_grpo" else None
    box = {}

    def fused(h, w, b):
        loss, aux = linear_grpo_loss(h, w, ids, mask, adv, old_logprobs=old, ref_logprobs=ref if beta else None,
                                     temperature=temperature, max_completion_length=max_len, bias=b,
                                     return_aux=AuxRequest(stats=True), options=FusedOptions(chunk_size=chunk), **kw)
        box["got"] = aux.stats
        return loss

    def unfused(h, w, b, box_key):
        logp = _logprob_ref(h, w, ids, b, temperature)[0]
        loss, box[box_key] = _grpo_ref(logp, mask, adv.to(logp.dtype), None if old is None else old.to(logp.dtype),
                                       ref.to(logp.dtype), max_completion_length=max_len, **kw)
        return loss

    gold = _run(lambda h, w, b: unfused(h, w, b, "gold"), F64, (hidden, weight, b))
    got = _run(fused, dtype, (hidden, weight, b))
    assert not torch.isnan(got[0])
    _compare(got, gold, dtype, atol, rtol, lambda: _run(lambda h, w, b: unfused(h, w, b, "ref"), dtype,
                                                        (hidden, weight, b)))
    for key, want in box["gold"].items():  # their metrics, with their tolerance
        torch.testing.assert_close(box["got"][key].double(), want.double(), atol=atol, rtol=rtol, msg=key)


@pytest.mark.parametrize("case", list(_grpo_cases()), ids=str)
def test_liger_grpo(case):
    shape, (dtype, atol, rtol), bias, loss_type, level, params, mode = case
    _grpo_case(shape, dtype, atol, rtol, bias, loss_type, level, params, mode, _gen("liger_grpo", case))


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_liger_grpo_many_chunks(loss_type):
    # their test_correctness_large_seq_exercises_chunking: B=1, H=256, V=5000, randn weights, the last 64 positions
    # masked, beta 0.04 without a reference model, tolerance 2e-5 / 1e-3; T cut from 4096 to 512 (16 chunks here).
    mask = torch.ones(1, 512)
    mask[:, -64:] = 0
    _grpo_case((1, 512, 256, 5000), F32, 2e-5, 1e-3, False, loss_type, "token", (0.04, 0.2, 0.2, 1.0),
               (False, False, False), _gen("liger_grpo_many", loss_type), mask=mask)


# ---------------------------------------------------------------------------------------------------------------
# Liger Kernel: chunked DPO (test/chunked_loss/test_dpo_loss.py, loss_type "sigmoid")
#
# Mapping: LigerFusedLinearDPOLoss(ignore_index=i, beta=beta, compute_nll_loss=nll, average_log_prob=True,
#   use_ref_model=True)(lin.weight, x, y, lin.bias, ref_x, ref_lin.weight, ref_lin.bias), the first half of the
#   batch chosen and the second rejected (as ours)
#   == linear_dpo_loss(x, lin.weight, where(kept, y, 0), mask, ref_seq, beta=beta, bias=lin.bias)
#      [+ linear_cross_entropy(x[:B], lin.weight, y[:B], bias=lin.bias, ignore_index=i) if nll, alpha = 1]
#   where kept = y != i. average_log_prob=True (a sequence's log-prob is the mean over its kept tokens) is the
#   float completion_mask kept / kept.sum(-1); ref_seq are the reference head's sequence log-probs, averaged the same
#   way, computed here (unfused, fp64) and passed per sequence (2B,). Their chosen/rejected rewards ->
#   AuxOutput.stats["chosen_rewards"], ["rejected_rewards"].
# Cut: (3, 47, 31, 123) only (B doubled to 6 sequences, as theirs); (8, 128, 1024, 4096) dropped (a size).
# ---------------------------------------------------------------------------------------------------------------

def _dpo_cases():
    for dtype_tol, bias, ref_bias, nll, (ii, beta) in itertools.product(
            [(F32, 1e-5, 5e-4)], (True, False), (True, False), (True, False), ((-100, 0.1), (42, 0.2))):
        yield dtype_tol, bias, ref_bias, nll, ii, beta
    for nll, (ii, beta) in itertools.product((True, False), ((-100, 0.1), (42, 0.2))):
        yield (BF16, 5e-2, 5e-1), True, True, nll, ii, beta


@pytest.mark.parametrize("case", list(_dpo_cases()), ids=str)
def test_liger_dpo(case):
    (dtype, atol, rtol), bias, ref_bias, nll, ignore_index, beta = case
    g = _gen("liger_dpo", case)
    b_, t_, h_, v = 2 * 3, 47, 31, 123
    hidden, weight = torch.randn(b_, t_, h_, generator=g).to(dtype), torch.randn(v, h_, generator=g).to(dtype)
    b = torch.randn(v, generator=g).to(dtype) if bias else None
    ref_hidden, ref_weight = torch.randn(b_, t_, h_, generator=g, dtype=F64), torch.randn(v, h_, generator=g, dtype=F64)
    ref_b = torch.randn(v, generator=g, dtype=F64) if ref_bias else None
    labels = _ignore_some(torch.randint(0, v, (b_, t_), generator=g), ignore_index, g)
    kept = labels != ignore_index
    ids = torch.where(kept, labels, 0)
    mask = kept.float() / kept.sum(-1, keepdim=True)  # average_log_prob=True
    with torch.no_grad():
        ref_seq = (_logprob_ref(ref_hidden, ref_weight, ids, ref_b)[0] * mask.double()).sum(-1).float()
    box = {}

    def fused(h, w, b):
        loss, aux = linear_dpo_loss(h, w, ids, mask, ref_seq, beta=beta, bias=b, return_aux=AuxRequest(stats=True),
                                    options=FusedOptions(chunk_size=32))
        box["got"] = aux.stats
        if nll:
            loss = loss + linear_cross_entropy(h[: b_ // 2], w, labels[: b_ // 2], bias=b, ignore_index=ignore_index)
        return loss

    def unfused(h, w, b, key):
        seq = (_logprob_ref(h, w, ids, b)[0] * mask.to(h.dtype)).sum(-1)
        rewards = beta * (seq - ref_seq.to(seq.dtype))
        chosen, rejected = rewards[: b_ // 2], rewards[b_ // 2:]
        box[key] = {"chosen_rewards": chosen.detach(), "rejected_rewards": rejected.detach()}
        loss = -F.logsigmoid(chosen - rejected).mean()
        if nll:
            loss = loss + _ce_ref(h[: b_ // 2], w, labels[: b_ // 2], b, ignore_index=ignore_index)
        return loss

    gold = _run(lambda h, w, b: unfused(h, w, b, "gold"), F64, (hidden, weight, b))
    got = _run(fused, dtype, (hidden, weight, b))
    _compare(got, gold, dtype, atol, rtol, lambda: _run(lambda h, w, b: unfused(h, w, b, "ref"), dtype,
                                                        (hidden, weight, b)))
    for key, want in box["gold"].items():
        _compare((box["got"][key],), (want,), dtype, atol, rtol, lambda: (box["ref"][key],))


# ---------------------------------------------------------------------------------------------------------------
# Cut Cross-Entropy (apple/ml-cross-entropy)
#
# Mapping: cut_cross_entropy.linear_cross_entropy(e, c, targets, bias=b, softcap=s, shift=k, reduction=r)
#   == linear_cross_entropy(e[:, :-k], c, targets[:, k:], bias=b, softcap=s, reduction=r) (we take no shift: the
#   caller shifts); return_lse=True -> AuxRequest(lse=True). Their z-loss, mean over kept tokens of lse^2 (weight 1)
#   added to the mean cross-entropy, is our z_loss=1.0 with "mean"; their test reduces "sum" to that same mean
#   (divided by the kept count), and "none" by a mean over every position (ignored ones included), which with a
#   z-loss has no single-call counterpart: the z-loss cases run with "mean" and "sum"/count.
# Their inputs: e = randn(N, D) / sqrt(D) viewed (4, N/4, D), c = randn(V, D) with c[:min(N, V)//2] = e[:min(N, V)//2]
# (rows whose target logit stands out), bias randn * 0.01 (forward, 0.02 backward), 20% of targets ignored.
# Their criterion: |cce - gt| <= |unfused in dtype - gt| + tol, elementwise, gt computed in fp32 (fp64 here);
# tol fp32 1e-5 (forward), 5e-4 (backward); fp16 1e-3; bf16 1e-2.
# Cut (backward): fp32 crosses reduction x z-loss x softcap x shift x invalids on (252, 507, 123) with a bias; bf16
# and fp16 take every shape and reduction with everything else on.
# ---------------------------------------------------------------------------------------------------------------

_CCE_SHAPES = [(256, 512, 128), (252, 507, 128), (252, 507, 123)]  # N, V, D
_CCE_FWD_TOL = {F32: 1e-5, F16: 1e-3, BF16: 1e-2}
_CCE_BWD_TOL = {F32: 5e-4, F16: 1e-3, BF16: 1e-2}


def _cce_inputs(shape, dtype, bias_scale, invalids, g):
    n, v, d = shape
    e = torch.randn(n, d, generator=g) / d ** 0.5
    c = torch.randn(v, d, generator=g)
    c[: min(n, v) // 2] = e[: min(n, v) // 2]
    bias = torch.randn(v, generator=g) * bias_scale if bias_scale else None
    targets = torch.randint(0, v, (n,), generator=g)
    if invalids:
        targets[torch.randperm(n, generator=g)[: int(0.2 * n)]] = -100
    return (e.to(dtype).view(4, -1, d), c.to(dtype), None if bias is None else bias.to(dtype),
            targets.view(4, -1))


def _shifted(e, targets, shift):
    return (e[:, :-shift], targets[:, shift:]) if shift else (e, targets)


@pytest.mark.parametrize("invalids", [False, True], ids=["all_kept", "20%_ignored"])
@pytest.mark.parametrize("shift", [0, 2])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("softcap", [None, 20.0])
@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=str)
@pytest.mark.parametrize("shape", _CCE_SHAPES, ids=str)
def test_cce_forward(shape, dtype, softcap, bias, shift, invalids):
    g = _gen("cce_forward", shape, str(dtype), softcap, bias, shift, invalids)
    e, c, b, targets = _cce_inputs(shape, dtype, 0.01 if bias else 0.0, invalids, g)
    e, targets = _shifted(e, targets, shift)

    def unfused(e_, c_):
        return _ce_ref(e_, c_, targets, None if b is None else b.to(e_.dtype), softcap=softcap, reduction="none")

    with torch.no_grad():
        gold = unfused(e.double(), c.double())
        ref = unfused(e, c)
        got = linear_cross_entropy(e, c, targets, bias=b, softcap=softcap, reduction="none",
                                   options=FusedOptions(chunk_size=100))
    assert got.shape == targets.shape and got.dtype == F32
    _no_worse((got,), (ref,), (gold,), atol=_CCE_FWD_TOL[dtype], rtol=0.0)


def _cce_backward_cases():
    for reduction, z_loss, softcap, shift, invalids in itertools.product(("none", "mean", "sum"), (True, False),
                                                                         (None, 20.0), (False, True), (False, True)):
        if z_loss and reduction == "none":
            continue  # see the section's comment
        yield (252, 507, 123), F32, softcap, True, shift, invalids, reduction, z_loss
    for shape, dtype, reduction in itertools.product(_CCE_SHAPES, (F16, BF16), ("none", "mean", "sum")):
        yield shape, dtype, 20.0, True, True, True, reduction, reduction != "none"


@pytest.mark.parametrize("case", list(_cce_backward_cases()), ids=str)
def test_cce_backward(case):
    shape, dtype, softcap, bias, shift, invalids, reduction, z_loss = case
    g = _gen("cce_backward", case)
    e, c, b, targets = _cce_inputs(shape, dtype, 0.02 if bias else 0.0, invalids, g)
    kept = (_shifted(e, targets, int(shift))[1] != -100).sum()
    opts = FusedOptions(chunk_size=100)

    def objective(loss, count):  # their test's reduction of each output to one number
        if reduction == "sum":
            loss = loss / count
        return loss.mean()

    def unfused(e_, c_, b_):
        e_, t = _shifted(e_, targets, int(shift))
        return objective(_ce_ref(e_, c_, t, b_, softcap=softcap, reduction=reduction, z_loss=float(z_loss)), kept)

    def fused(e_, c_, b_):
        e_, t = _shifted(e_, targets, int(shift))
        loss = linear_cross_entropy(e_, c_, t, bias=b_, softcap=softcap, reduction=reduction, options=opts,
                                    z_loss=float(z_loss))
        return objective(loss, kept)

    gold = _run(unfused, F64, (e, c, b))
    got = _run(fused, dtype, (e, c, b))
    tol = _CCE_BWD_TOL[dtype]
    if dtype == F32:  # fp32 "unfused - gt" is fp32 rounding: the tolerance alone, against fp64
        _close(got, gold, atol=tol, rtol=0.0)
    else:
        _no_worse(got, _run(unfused, dtype, (e, c, b)), gold, atol=tol, rtol=0.0)


@pytest.mark.parametrize("requires", [(True, False, True), (False, True, False), (False, False, True)],
                         ids=["d_e+d_bias", "d_c", "d_bias"])
def test_cce_partials(requires):
    # their test_loss_partials: bf16, (256, 512, 128), bias * 0.01, "mean": a gradient exactly where one is asked for
    g = _gen("cce_partials", requires)
    e, c, b, targets = _cce_inputs((256, 512, 128), BF16, 0.01, False, g)
    leaves = [t.detach().clone().requires_grad_(r) for t, r in zip((e, c, b), requires)]
    linear_cross_entropy(*leaves[:2], targets, bias=leaves[2], options=FusedOptions(chunk_size=100)).backward()
    gold_leaves = [t.detach().double().requires_grad_(r) for t, r in zip((e, c, b), requires)]
    _ce_ref(*gold_leaves[:2], targets, gold_leaves[2]).backward()
    for t, want, r in zip(leaves, gold_leaves, requires):
        assert (t.grad is not None) == r
        if r:
            torch.testing.assert_close(t.grad.double(), want.grad, atol=1e-2, rtol=1.6e-2)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("softcap", [None, 20.0])
@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=str)
@pytest.mark.parametrize("shape", [(256, 512, 128), (255, 507, 128), (255, 507, 123)], ids=str)
def test_cce_lse(shape, dtype, softcap, bias):
    # their test_lse -> AuxOutput.lse: no further from fp64 than the unfused logsumexp in the dtype, + 1e-5
    g = _gen("cce_lse", shape, str(dtype), softcap, bias)
    n, v, d = shape
    e = (torch.randn(n, d, generator=g) / d ** 0.5)
    c = torch.randn(v, d, generator=g)
    c[: min(n, v) // 2] = e[: min(n, v) // 2]
    e, c = e.to(dtype), c.to(dtype)
    b = (torch.randn(v, generator=g) * 0.02).to(dtype) if bias else None
    targets = torch.randint(0, v, (n,), generator=g)

    def unfused(e_, c_, b_):
        z = _logits(e_, c_, b_)
        return (z if softcap is None else softcap * torch.tanh(z / softcap)).logsumexp(-1)

    _, aux = linear_cross_entropy(e, c, targets, bias=b, softcap=softcap, return_aux=AuxRequest(lse=True),
                                  options=FusedOptions(chunk_size=100))
    gold = unfused(e.double(), c.double(), None if b is None else b.double())
    _no_worse((aux.lse,), (unfused(e, c, b),), (gold,), atol=1e-5, rtol=0.0)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("invalids", [False, True], ids=["no_targets", "two_kept"])
def test_cce_compute_z_loss(reduction, shift, invalids):
    # their test_compute_z_loss: lse = 1..10; with targets, all ignored except positions 3 and 5 (before the shift),
    # so the z-loss sums to (4 - shift)^2 + (6 - shift)^2, and "mean" averages over the two kept tokens. With one
    # class (V = 1, weight [[1]]) the logit is the lse and the cross-entropy is 0: the call returns the z-loss alone.
    lse = torch.arange(1, 11, dtype=F64)
    if invalids:
        targets = torch.full((10 + int(shift),), -100)
        targets[3] = targets[5] = 0  # their class 1 is our only class, 0
        targets = targets[int(shift):]
        expected = (4 - int(shift)) ** 2 + (6 - int(shift)) ** 2
        count = 2
    else:
        targets = torch.zeros(10, dtype=torch.long)
        expected, count = sum(i ** 2 for i in range(1, 11)), 10
    got = linear_cross_entropy(lse.unsqueeze(-1), torch.ones(1, 1, dtype=F64), targets, z_loss=1.0,
                               reduction=reduction)
    if reduction == "none":
        assert got.shape == lse.shape
    total = got.sum() * (count if reduction == "mean" else 1)
    torch.testing.assert_close(total, torch.tensor(float(expected), dtype=F64))


# ---------------------------------------------------------------------------------------------------------------
# TRL: chunked log-probs and entropy (tests/test_utils.py)
#
# Mapping: _ChunkedLogProbFunction.apply(hidden, weight, labels, temperature, chunk_size) -> (logprobs, entropy)
#   == linear_token_logprobs(hidden, weight, labels, temperature=temperature, return_entropy=True,
#   options=FusedOptions(chunk_size=chunk_size)). selective_log_softmax(logits, index) and
#   entropy_from_logits(logits, chunk_size) take logits; ours take the head, so the logits are hidden @ weight.T with
#   weight = randn / sqrt(D) (logit std ~1, as their randn logits). A (B, T, k) index (k ids per position) is hidden
#   expanded to (B, T, k, D) (k-fold compute). Their patched LM head masks prompt positions inside the kernel; ours
#   computes every position and the caller masks (the upstream gradient).
# Difference on purpose: from bf16/fp16 inputs TRL returns exact half-precision results; ours are fp32, compared
# with the unfused code's error in that dtype plus TRL's 1e-5.
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_trl_chunked_logprobs_forward(temperature):
    # N=64, H=32, V=128, chunk 32, hidden and weight randn (logit std ~6: confident rows), 1e-5 on both outputs
    g = _gen("trl_forward", temperature)
    hidden, weight = torch.randn(64, 32, generator=g), torch.randn(128, 32, generator=g)
    labels = torch.randint(0, 128, (64,), generator=g)
    got = linear_token_logprobs(hidden, weight, labels, temperature=temperature, return_entropy=True,
                                options=FusedOptions(chunk_size=32))
    want = _logprob_ref(hidden.double(), weight.double(), labels, temperature=temperature)
    for name, g_, w_ in zip(("logprobs", "entropy"), got, want):
        torch.testing.assert_close(g_.double(), w_, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype_tol", [(F32, 1e-5), (BF16, 1e-2)], ids=lambda t: str(t[0]))
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_trl_chunked_logprobs_backward(temperature, dtype_tol):
    # backward of logprobs.sum(); fp32 1e-5, bf16 1e-2 (their test_backward and test_backward_bfloat16)
    dtype, tol = dtype_tol
    g = _gen("trl_backward", temperature, str(dtype))
    hidden, weight = torch.randn(64, 32, generator=g).to(dtype), torch.randn(128, 32, generator=g).to(dtype)
    labels = torch.randint(0, 128, (64,), generator=g)

    def fused(h, w):
        return linear_token_logprobs(h, w, labels, temperature=temperature, options=FusedOptions(chunk_size=32))

    def unfused(h, w):
        return _logprob_ref(h, w, labels, temperature=temperature)[0]

    gold = _run(unfused, F64, (hidden, weight))
    got = _run(fused, dtype, (hidden, weight))
    _compare(got, gold, dtype, tol, tol, lambda: _run(unfused, dtype, (hidden, weight)))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_trl_patched_lm_head_completion_mask(temperature):
    # TestPatchChunkedLMHead's dummy model: B=4, S=16, H=32, V=128, chunk 32, the second half of each sequence is
    # the completion; log-probs of labels[:, 1:] from hidden[:, :-1]; backward of sum(log_probs * completion mask).
    g = _gen("trl_patched", temperature)
    hidden, weight = torch.randn(4, 16, 32, generator=g), torch.randn(128, 32, generator=g) / 32 ** 0.5
    input_ids = torch.randint(0, 128, (4, 16), generator=g)
    completion = torch.zeros(4, 16)
    completion[:, 8:] = 1.0
    upstream = completion[:, 1:].double()

    def fused(h, w):
        return linear_token_logprobs(h[:, :-1], w, input_ids[:, 1:], temperature=temperature,
                                     options=FusedOptions(chunk_size=32))

    def unfused(h, w):
        return _logprob_ref(h[:, :-1], w, input_ids[:, 1:], temperature=temperature)[0]

    _close(_run(fused, F32, (hidden, weight), upstream=upstream),
           _run(unfused, F64, (hidden, weight), upstream=upstream), atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # their masked forward: log-probs and entropy at the completion positions
        got = linear_token_logprobs(hidden[:, :-1], weight, input_ids[:, 1:], temperature=temperature,
                                    return_entropy=True, options=FusedOptions(chunk_size=32))
        want = _logprob_ref(hidden[:, :-1].double(), weight.double(), input_ids[:, 1:], temperature=temperature)
    at = completion[:, 1:].bool()
    for g_, w_ in zip(got, want):
        torch.testing.assert_close(g_[at].double(), w_[at], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [F64, F32, F16, BF16], ids=str)
@pytest.mark.parametrize("chunk", [1, 16])
@pytest.mark.parametrize("lead", [(), (32,), (8, 16), (2, 4, 8)], ids=str)  # their logits (*lead, 768)
def test_trl_entropy_from_logits(lead, chunk, dtype):
    g = _gen("trl_entropy", lead, chunk, str(dtype))
    d, v = 16, 768
    hidden, weight = torch.randn(*lead, d, generator=g).to(dtype), (torch.randn(v, d, generator=g) / d ** 0.5).to(dtype)
    ids = torch.randint(0, v, lead, generator=g)

    def fused(h, w):
        return linear_token_logprobs(h, w, ids, return_entropy=True, options=FusedOptions(chunk_size=chunk))[1]

    def unfused(h, w):
        return _logprob_ref(h, w, ids)[1]

    with torch.no_grad():
        got = fused(hidden, weight)
        gold = unfused(hidden.double(), weight.double())
        assert got.shape == lead and got.dtype == _wide(dtype)
        if dtype in (F64, F32):
            torch.testing.assert_close(got.double(), gold, atol=1e-5, rtol=1e-5)
        else:
            _no_worse((got,), (unfused(hidden, weight),), (gold,), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("k", [None, 1, 8])  # None: a (B, T) index; 1 and 8: TRL's (B, T, k) multi-index
@pytest.mark.parametrize("dtype", [F64, F32, F16, BF16], ids=str)
def test_trl_selective_log_softmax(dtype, k):
    # V=1024, B=4, T=32; fp32/fp64 1e-5 (TRL: exact for half precision; see the section's comment)
    g = _gen("trl_selective", str(dtype), k)
    d, v = 16, 1024
    hidden, weight = torch.randn(4, 32, d, generator=g).to(dtype), (torch.randn(v, d, generator=g) / d ** 0.5).to(dtype)
    index = torch.randint(0, v, (4, 32) if k is None else (4, 32, k), generator=g)
    if k is not None:
        hidden = hidden.unsqueeze(2).expand(4, 32, k, d)
    with torch.no_grad():
        got = linear_token_logprobs(hidden, weight, index, options=FusedOptions(chunk_size=100))
        gold = _logprob_ref(hidden.double(), weight.double(), index)[0]
        assert got.shape == index.shape
        if dtype in (F64, F32):
            torch.testing.assert_close(got.double(), gold, atol=1e-5, rtol=1e-5)
        else:
            _no_worse((got,), (_logprob_ref(hidden, weight, index)[0],), (gold,), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# TRL: the generalized JSD of GKD and the distillation trainer (divergence tests)
#
# Mapping: generalized_jsd_loss(student_logits, teacher_logits, labels, beta, temperature, reduction)
#   == linear_kd_loss(x_s, W_s, x_t, W_t, labels, temperature=temperature, **_kind(beta)) with the logits given
#   exactly by hidden = logits, weight = identity (D = V). Reductions: "batchmean" with labels is our "mean" over
#   kept tokens (labels -100 ignored); "batchmean" without labels divides the sum by the batch size B, not by the
#   B*T tokens: our "sum" / B; "sum" is ours; "mean" divides by B*T*V elements: our "sum" / (B*T*V); "none" is
#   per element (B, T, V), ours per token (B, T) = its sum over V. No T^2.
# ---------------------------------------------------------------------------------------------------------------

def _trl_jsd(student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0, reduction="batchmean",
             fused=True):
    v = student_logits.shape[-1]
    eye = torch.eye(v, dtype=student_logits.dtype)
    fn = linear_kd_loss if fused else _kd_ref
    ours = "mean" if (reduction == "batchmean" and labels is not None) else "none" if reduction == "none" else "sum"
    loss = fn(student_logits, eye, teacher_logits, eye, labels, temperature=temperature, reduction=ours,
              **_kind(beta))
    if reduction == "batchmean" and labels is None:
        return loss / student_logits.shape[0]
    return loss / student_logits[..., 0].numel() / v if reduction == "mean" else loss


_PINNED_LABELS = torch.tensor([[-100, 1, 2], [-100, -100, 3]])


# TestGeneralizedJSDLossIsPinned: beta x labels or not at temperature 1, and beta at temperature 2 with labels
_PINNED = [*((beta, labels, 1.0) for beta in (0.0, 0.25, 1.0) for labels in (False, True)),
           *((beta, True, 2.0) for beta in (0.0, 0.25, 1.0))]


@pytest.mark.parametrize("beta, use_labels, temperature", _PINNED, ids=str)
def test_trl_jsd_pinned(beta, use_labels, temperature):
    # seeded (2, 3, 5) logits and their labels
    g = torch.Generator().manual_seed(42)
    student, teacher = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    labels = _PINNED_LABELS if use_labels else None

    def call(fused):
        return lambda s: _trl_jsd(s, teacher.to(s.dtype), labels, beta, temperature, fused=fused)

    _close(_run(call(True), F32, (student,)), _run(call(False), F64, (student,)), atol=1e-5, rtol=1.3e-6)


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_trl_jsd_ends(beta):
    # test_generalized_jsd_loss_edge_cases: student p = (0.1, 0.9), teacher (0.9, 0.1); beta = 1 is
    # KL(student || teacher), beta = 0 is KL(teacher || student), to 5 decimals
    student, teacher = torch.tensor([[[0.1, 0.9]]]).log(), torch.tensor([[[0.9, 0.1]]]).log()
    p, q = (student, teacher) if beta == 1.0 else (teacher, student)
    want = (p.exp() * (p - q)).sum()
    assert abs(_trl_jsd(student, teacher, beta=beta).item() - want.item()) < 1e-5


def test_trl_jsd_properties():
    # uniform logits: 0 (5 decimals); identical logits: 0 (6 decimals); beta = 0.5 symmetric in the two models,
    # beta = 0.1 not; beta 0 and 1 differ; temperature 1 and 2 differ (their (2, 3, 5) randn logits)
    g = _gen("trl_jsd_properties")
    student, teacher = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    assert abs(_trl_jsd(torch.ones(1, 1, 5), torch.ones(1, 1, 5)).item()) < 1e-5
    same = torch.randn(2, 3, 5, generator=g)
    assert abs(_trl_jsd(same, same).item()) < 1e-6
    torch.testing.assert_close(_trl_jsd(student, teacher, beta=0.5), _trl_jsd(teacher, student, beta=0.5))
    assert not torch.allclose(_trl_jsd(student, teacher, beta=0.1), _trl_jsd(teacher, student, beta=0.1))
    assert _trl_jsd(student, teacher, beta=0.0) != _trl_jsd(student, teacher, beta=1.0)
    assert _trl_jsd(student, teacher, temperature=1.0) != _trl_jsd(student, teacher, temperature=2.0)


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
def test_trl_jsd_reductions(reduction):
    # test_reduction_methods: every reduction, values against the reference (shapes: scalar; per token for "none")
    g = _gen("trl_jsd_reductions", reduction)
    student, teacher = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    got = _trl_jsd(student, teacher, reduction=reduction)
    want = _trl_jsd(student.double(), teacher.double(), reduction=reduction, fused=False)
    assert got.shape == ((2, 3) if reduction == "none" else ())
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_jsd_ends_are_zero_not_kl(beta):
    # Liger and TRL special-case beta 0 and 1 to the two KLs (mapped by _kind). Ours keeps the generalized JSD's
    # own limit there, on purpose: m equals one of the two distributions, so the loss and its gradients are 0.
    g = _gen("jsd_ends", beta)
    x_s, w_s, x_t, w_t, _ = _jsd_inputs((2, 9, 16, 41), F32, 1.0, g)
    got = _run(lambda h, w: linear_kd_loss(h, w, x_t, w_t, kind="jsd", beta=beta), F32, (x_s, w_s))
    assert all(not t.any() for t in got)
