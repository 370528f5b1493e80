"""Per-token log-probs, GRPO family and DPO against plain PyTorch written from the formulas (CPU)."""
import pytest
import torch
import torch.nn.functional as F

from lce_compile import (AuxRequest, FusedOptions, LinearDPOLoss, LinearGRPOLoss, LinearTokenLogprobs,
                         linear_cross_entropy, linear_dpo_loss, linear_grpo_loss, linear_token_logprobs)
from lce_compile.testing import assert_no_less_accurate
from memtrack import AllocationTracker

V, D = 157, 24
OPTS = FusedOptions(chunk_size=16)


def _inputs(b, t, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, D, generator=g, dtype=dtype)
    weight = torch.randn(V, D, generator=g, dtype=dtype) * (3 / D ** 0.5)
    ids = torch.randint(0, V, (b, t), generator=g)
    lengths = torch.randint(0, t + 1, (b,), generator=g)
    lengths[0] = 0                                        # an empty sequence
    mask = torch.arange(t)[None] < lengths[:, None]       # ragged completions
    return hidden, weight, ids, mask, g


def ref_logprobs(hidden, weight, ids, temperature=1.0):
    logits = (hidden @ weight.T).to(torch.promote_types(hidden.dtype, torch.float32)) / temperature
    logp_all = logits.log_softmax(-1)
    return logp_all.gather(-1, ids.unsqueeze(-1)).squeeze(-1), -(logp_all.exp() * logp_all).sum(-1)


def ref_grpo(hidden, weight, ids, mask, adv, old=None, ref=None, beta=0.04, eps_low=0.2, eps_high=0.2,
             loss_type="grpo", level="token", temperature=1.0, max_len=None):
    logp, _ = ref_logprobs(hidden, weight, ids, temperature)
    b, t = ids.shape
    old = logp.detach() if old is None else old
    per_seq, total, count = [], 0.0, 0
    for i in range(b):
        m = mask[i]
        lr = logp[i] - old[i]
        if level == "sequence":
            lr = (lr[m].sum() / max(int(m.sum()), 1)).expand(t)
        ratio = lr.exp()
        loss = -torch.minimum(ratio * adv[i], ratio.clamp(1 - eps_low, 1 + eps_high) * adv[i])
        if beta:
            d = ref[i] - logp[i]
            loss = loss + beta * (d.exp() - d - 1)
        per_seq.append(loss[m].sum() / max(int(m.sum()), 1))
        total = total + loss[m].sum()
        count += int(m.sum())
    if loss_type == "grpo":
        return torch.stack(per_seq).mean()
    if loss_type == "dr_grpo":
        return total / (b * (max_len or t))
    return total / max(count, 1)


def _grads(fn, hidden, weight, dtype):
    h = hidden.detach().to(dtype).requires_grad_()
    w = weight.detach().to(dtype).requires_grad_()
    out = fn(h, w)
    out.backward()
    return out.detach(), h.grad, w.grad


def _close(got, gold, rtol=1e-4):
    for g, want in zip(got, gold):
        torch.testing.assert_close(g.double(), want.double(), rtol=rtol, atol=1e-5 * want.abs().max().item() + 1e-8)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("shape", [(1, 1), (3, 29)], ids=str)
def test_logprobs_and_entropy_any_upstream(shape, temperature):
    hidden, weight, ids, _, g = _inputs(*shape, seed=1)
    up_lp, up_ent = torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g,
                                                                                      dtype=torch.float64)

    def ref(h, w):
        lp, ent = ref_logprobs(h, w, ids, temperature)
        return (lp * up_lp).sum() + (ent * up_ent).sum()

    def fused(h, w):
        lp, ent = linear_token_logprobs(h, w, ids, temperature=temperature, return_entropy=True, options=OPTS)
        assert lp.shape == ids.shape and ent.shape == ids.shape
        return (lp.double() * up_lp).sum() + (ent.double() * up_ent).sum()

    _close(_grads(fused, hidden, weight, torch.float32), _grads(ref, hidden, weight, torch.float64))
    lp = linear_token_logprobs(hidden.float(), weight.float(), ids, temperature=temperature)
    torch.testing.assert_close(lp.double(), ref_logprobs(hidden, weight, ids, temperature)[0], rtol=1e-5, atol=1e-5)


def test_logprobs_bf16_no_less_accurate_than_unfused():
    hidden, weight, ids, _, g = _inputs(4, 100, seed=2)
    up = torch.randn(ids.shape, generator=g, dtype=torch.float64)
    gold = _grads(lambda h, w: (ref_logprobs(h, w, ids)[0] * up).sum(), hidden, weight, torch.float64)
    base = _grads(lambda h, w: (ref_logprobs(h, w, ids)[0].double() * up).sum(), hidden, weight, torch.bfloat16)
    got = _grads(lambda h, w: (linear_token_logprobs(h, w, ids, options=FusedOptions(chunk_size=64)).double()
                               * up).sum(), hidden, weight, torch.bfloat16)
    assert_no_less_accurate(got, base, gold, names=("value", "grad_hidden", "grad_weight"))


GRPO_CASES = [
    {"loss_type": "grpo"},
    {"loss_type": "bnpo", "beta": 0.0},
    {"loss_type": "dr_grpo", "max_len": 40},
    {"loss_type": "dapo", "eps_high": 0.28, "level": "sequence"},
    {"loss_type": "grpo", "level": "sequence", "temperature": 0.8},
    {"loss_type": "dr_grpo", "old": None},
]


@pytest.mark.parametrize("case", GRPO_CASES, ids=str)
def test_grpo_matches_formulas(case):
    case = dict(case)
    hidden, weight, ids, mask, g = _inputs(5, 21, seed=3)
    adv = torch.randn(5, generator=g, dtype=torch.float64)
    with torch.no_grad():
        cur, _ = ref_logprobs(hidden, weight, ids)
    old = case.pop("old", cur + 0.3 * torch.randn(cur.shape, generator=g, dtype=torch.float64))
    ref = cur + 0.2 * torch.randn(cur.shape, generator=g, dtype=torch.float64)
    beta, loss_type = case.get("beta", 0.04), case["loss_type"]
    level, temperature = case.get("level", "token"), case.get("temperature", 1.0)
    eps_high, max_len = case.get("eps_high", 0.2), case.get("max_len")
    gold = _grads(lambda h, w: ref_grpo(h, w, ids, mask, adv, old, ref, beta, 0.2, eps_high, loss_type, level,
                                        temperature, max_len), hidden, weight, torch.float64)
    got = _grads(lambda h, w: linear_grpo_loss(
        h, w, ids, mask, adv.float(), old_logprobs=None if old is None else old.float(), ref_logprobs=ref.float(),
        beta=beta, epsilon_high=eps_high, loss_type=loss_type, importance_sampling_level=level,
        temperature=temperature, max_completion_length=max_len, options=OPTS), hidden, weight, torch.float32)
    _close(got, gold)


def test_grpo_stats_and_module_form():
    hidden, weight, ids, mask, g = _inputs(4, 17, seed=4)
    adv = torch.randn(4, generator=g)
    cur, ent = ref_logprobs(hidden, weight, ids)
    old = (cur + 0.5 * torch.randn(cur.shape, generator=g, dtype=torch.float64)).float()
    ref = (cur + 0.1 * torch.randn(cur.shape, generator=g, dtype=torch.float64)).float()
    module = LinearGRPOLoss(beta=0.1, loss_type="grpo", return_aux=AuxRequest(stats=True), options=OPTS)
    loss, aux = module(hidden.float(), weight.float(), ids, mask, adv, old, ref)
    stats = aux.stats
    m = mask.double()
    ratio = (cur - old.double()).exp()
    clipped = ((ratio < 0.8) & (adv[:, None] < 0)) | ((ratio > 1.2) & (adv[:, None] > 0))
    d = ref.double() - cur
    want = {"clip_ratio": (clipped * m).sum() / m.sum(), "entropy": (ent * m).sum() / m.sum(),
            "kl": ((d.exp() - d - 1) * m).sum() / m.sum()}
    assert set(stats) == set(want)
    for key, value in want.items():
        torch.testing.assert_close(stats[key].double(), value, rtol=1e-4, atol=1e-6)
    gold = ref_grpo(hidden, weight, ids, mask, adv.double(), old.double(), ref.double(), beta=0.1)
    torch.testing.assert_close(loss.double(), gold, rtol=1e-4, atol=1e-6)
    assert "beta=0.1" in repr(module)


@pytest.mark.parametrize("per_token_ref", [False, True])
@pytest.mark.parametrize("reduction,label_smoothing", [("mean", 0.0), ("sum", 0.1), ("none", 0.25)])
def test_dpo_matches_formulas(per_token_ref, reduction, label_smoothing):
    hidden, weight, ids, mask, g = _inputs(6, 13, seed=5)
    ref_tok = torch.randn(ids.shape, generator=g, dtype=torch.float64) - 3
    ref = ref_tok if per_token_ref else (ref_tok * mask).sum(-1)
    up = torch.randn(3, generator=g, dtype=torch.float64) if reduction == "none" else None

    def reference(h, w):
        logp, _ = ref_logprobs(h, w, ids)
        seq = (logp * mask).sum(-1)
        r = (ref_tok * mask).sum(-1)
        margin = 0.2 * ((seq[:3] - r[:3]) - (seq[3:] - r[3:]))
        loss = -(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)
        loss = loss.mean() if reduction == "mean" else loss.sum() if reduction == "sum" else loss
        return loss if up is None else (loss * up).sum()

    def fused(h, w):
        loss = linear_dpo_loss(h, w, ids, mask, ref.float(), beta=0.2, label_smoothing=label_smoothing,
                               reduction=reduction, options=OPTS)
        return loss if up is None else (loss.double() * up).sum()

    _close(_grads(fused, hidden, weight, torch.float32), _grads(reference, hidden, weight, torch.float64))


def test_dpo_stats_and_module_form():
    hidden, weight, ids, mask, g = _inputs(4, 9, seed=6)
    ref = torch.randn(4, generator=g)
    loss, aux = LinearDPOLoss(beta=0.5, return_aux=AuxRequest(stats=True))(hidden.float(), weight.float(), ids, mask,
                                                                           ref)
    stats = aux.stats
    logp, _ = ref_logprobs(hidden, weight, ids)
    rewards = 0.5 * ((logp * mask).sum(-1) - ref.double())
    torch.testing.assert_close(stats["chosen_rewards"].double(), rewards[:2], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(stats["rejected_rewards"].double(), rewards[2:], rtol=1e-4, atol=1e-5)
    assert stats["reward_accuracy"].item() == (rewards[:2] > rewards[2:]).double().mean().item()
    torch.testing.assert_close(loss.double(), -F.logsigmoid(rewards[:2] - rewards[2:]).mean(), rtol=1e-4, atol=1e-6)
    lp = LinearTokenLogprobs(temperature=0.5)(hidden.float(), weight.float(), ids)
    torch.testing.assert_close(lp.double(), ref_logprobs(hidden, weight, ids, 0.5)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_no_n_by_v_tensor(level):
    b, t, vocab, chunk = 8, 256, 4096, 32
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(b, t, 32, generator=g, requires_grad=True)
    weight = torch.randn(vocab, 32, generator=g, requires_grad=True)
    ids = torch.randint(0, vocab, (b, t), generator=g)
    mask = torch.rand(b, t, generator=g) < 0.8
    adv = torch.randn(b, generator=g)
    ref = torch.randn(b, t, generator=g) - 8
    opts = FusedOptions(chunk_size=chunk, compile=False)
    with AllocationTracker(inputs=(hidden, weight, ids, mask, adv, ref)) as tracker:
        loss, _ = linear_grpo_loss(hidden, weight, ids, mask, adv, ref_logprobs=ref, return_aux=AuxRequest(stats=True),
                                   importance_sampling_level=level, options=opts)
        loss.backward()
    n = b * t
    grads = hidden.grad.nbytes + weight.grad.nbytes
    assert tracker.largest < n * vocab // 10, f"a tensor of {tracker.largest} elements was allocated"
    assert tracker.peak <= grads + 12 * chunk * vocab * 4 + 64 * n, f"peak {tracker.peak / 1e6:.1f} MB"


def test_return_aux_is_one_request_type_and_return_stats_is_deprecated():
    hidden, weight, ids, mask, g = _inputs(4, 9, seed=8)
    h, w = hidden.float(), weight.float()
    adv, ref = torch.randn(4, generator=g), torch.randn(4, generator=g)
    lp, aux = linear_token_logprobs(h, w, ids, return_aux=AuxRequest(entropy=True), options=OPTS)
    want_lp, want_ent = linear_token_logprobs(h, w, ids, return_entropy=True, options=OPTS)
    torch.testing.assert_close((lp, aux.entropy), (want_lp, want_ent), rtol=0, atol=0)
    assert aux.loss is None and aux.stats is None
    loss, aux = linear_grpo_loss(h, w, ids, mask, adv, beta=0.0, return_aux=AuxRequest(stats=True), options=OPTS)
    with pytest.warns(DeprecationWarning, match=r"return_aux=AuxRequest\(stats=True\)"):
        old_loss, old_stats = linear_grpo_loss(h, w, ids, mask, adv, beta=0.0, return_stats=True, options=OPTS)
    torch.testing.assert_close((loss, aux.stats), (old_loss, old_stats), rtol=0, atol=0)
    with pytest.warns(DeprecationWarning):
        _, old_stats = linear_dpo_loss(h, w, ids, mask, ref, return_stats=True, options=OPTS)
    assert set(old_stats) == set(linear_dpo_loss(h, w, ids, mask, ref, return_aux=AuxRequest(stats=True))[1].stats)
    with pytest.raises(ValueError, match="return_aux asks for lse, which this loss does not give; it gives stats"):
        linear_grpo_loss(h, w, ids, mask, adv, beta=0.0, return_aux=AuxRequest(lse=True))
    with pytest.raises(ValueError, match="linear_cross_entropy: return_aux asks for entropy"):
        linear_cross_entropy(h.flatten(0, 1), w, ids.flatten(), return_aux=AuxRequest(entropy=True))
    with pytest.raises(ValueError, match="LinearTokenLogprobs: return_aux asks for stats"):
        LinearTokenLogprobs(return_aux=AuxRequest(stats=True))
    with pytest.raises(TypeError, match="both return_stats= and return_aux="):
        linear_dpo_loss(h, w, ids, mask, ref, return_stats=True, return_aux=AuxRequest(stats=True))


@pytest.mark.parametrize("transform", [{"softcap": 2.0}, {"logit_scale": 0.5, "softcap": 3.0, "temperature": 0.7},
                                       {"logit_scale": 1.5}], ids=str)
def test_logprob_transforms_and_statistics(transform):
    """Transform order z * logit_scale -> softcap -> / temperature; entropy differentiable, the statistics
    detached, against an fp64 unfused reference; is_top1 takes the first of tied maxima."""
    hidden, weight, ids, _, g = _inputs(3, 29, seed=9)
    ids[0, :4] = (hidden[0, :4] @ weight.T).argmax(-1)  # some tokens are the argmax
    scale, cap, temp = transform.get("logit_scale", 1.0), transform.get("softcap"), transform.get("temperature", 1.0)
    up_lp, up_ent = (torch.randn(ids.shape, generator=g, dtype=torch.float64) for _ in range(2))

    def reference(h, w):
        z = (h @ w.T) * scale
        z = cap * torch.tanh(z / cap) if cap else z
        logp_all = (z / temp).log_softmax(-1)
        lp = logp_all.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
        ent = -(logp_all.exp() * logp_all).sum(-1)
        stats = ((2 * logp_all).logsumexp(-1), (z / temp).mean(-1), (z / temp).argmax(-1) == ids)
        reference.stats = stats
        return (lp * up_lp).sum() + (ent * up_ent).sum()

    def fused(h, w):
        lp, aux = linear_token_logprobs(h, w, ids, options=OPTS, **transform, return_aux=AuxRequest(
            entropy=True, log_sum_sq_probs=True, mean_logits=True, is_top1=True))
        fused.stats = aux.log_sum_sq_probs, aux.mean_logits, aux.is_top1
        assert not any(s.requires_grad for s in fused.stats)
        return (lp.double() * up_lp).sum() + (aux.entropy.double() * up_ent).sum()

    _close(_grads(fused, hidden, weight, torch.float32), _grads(reference, hidden, weight, torch.float64))
    for got, want in zip(fused.stats[:2], reference.stats[:2]):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(fused.stats[2], reference.stats[2]) and fused.stats[2].any()


@pytest.mark.parametrize("logit_std", [1.0, 6.0, 16.0])
def test_entropy_and_logprobs_of_confident_rows_no_less_accurate_than_unfused(logit_std):
    """fp32 against fp64, 512 tokens, V 4096: the entropy and log-probs keep the max and the log-normalizer apart
    (as log_softmax does), so confident rows (large logits) lose nothing to cancellation; their gradients too."""
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(512, 256, generator=g, dtype=torch.float64)
    weight = torch.randn(4096, 256, generator=g, dtype=torch.float64) * (logit_std / 256 ** 0.5)
    ids = torch.randint(0, 4096, (512,), generator=g)
    up_lp, up_ent = (torch.randn(512, generator=g, dtype=torch.float64) for _ in range(2))

    def objective(lp, ent):
        return (lp.double() * up_lp).sum() + (ent.double() * up_ent).sum()

    def unfused(h, w):
        return objective(*ref_logprobs(h, w, ids))

    def fused(h, w):
        return objective(*linear_token_logprobs(h, w, ids, return_entropy=True, options=FusedOptions(chunk_size=128)))

    for name, pick in (("logprobs", 0), ("entropy", 1)):
        gold = ref_logprobs(hidden, weight, ids)[pick]
        ref = ref_logprobs(hidden.float(), weight.float(), ids)[pick]
        got = linear_token_logprobs(hidden.float(), weight.float(), ids, return_entropy=True)[pick]
        assert_no_less_accurate((got,), (ref,), (gold,), names=(name,))
    assert_no_less_accurate(_grads(fused, hidden, weight, torch.float32), _grads(unfused, hidden, weight, torch.float32),
                            _grads(unfused, hidden, weight, torch.float64),
                            names=("objective", "grad_hidden", "grad_weight"))


def test_a_single_unbatched_token():
    """hidden (D,), a 0-dim token id: 0-dim log-prob and entropy, and linear_kd_loss(reduction="none") too."""
    from lce_compile import linear_kd_loss
    from lce_compile.testing import unfused_kd

    hidden, weight, ids, _, g = _inputs(1, 1, seed=8)
    hidden, token = hidden[0, 0].float(), ids[0, 0]
    logp, ent = linear_token_logprobs(hidden, weight.float(), token, return_entropy=True)
    want_lp, want_ent = ref_logprobs(hidden.double(), weight, token)
    assert logp.shape == ent.shape == ()
    torch.testing.assert_close(logp, want_lp.float())
    torch.testing.assert_close(ent, want_ent.float())
    t_hidden, t_weight = torch.randn(D, generator=g), torch.randn(V, D, generator=g)
    kd = linear_kd_loss(hidden, weight.float(), t_hidden, t_weight, reduction="none")
    assert kd.shape == ()
    want = unfused_kd(hidden.double()[None], weight, t_hidden.double()[None], t_weight.double(), reduction="none")
    torch.testing.assert_close(kd, want.float().reshape(()))


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_masked_tokens_cost_nothing(level):
    """GRPO (token and sequence level) and DPO: completion tokens outside the mask are not computed (the matmul
    work is the kept fraction, their count read back with the token-id check), and the losses are unchanged."""
    from test_cross_entropy import _MatmulFlops

    hidden, weight, ids, mask, g = _inputs(4, 40, seed=9, dtype=torch.float32)
    adv, ref = torch.randn(4, generator=g), -torch.rand(4, generator=g) * 50
    kept = int(mask.sum())
    losses = {"grpo": lambda h, w, o: linear_grpo_loss(h, w, ids, mask, adv, importance_sampling_level=level,
                                                       options=o),
              "dpo": lambda h, w, o: linear_dpo_loss(h, w, ids, mask, ref, options=o)}
    for name, loss in losses.items():
        with _MatmulFlops() as gathered:
            got = _grads(lambda h, w: loss(h, w, None), hidden, weight, torch.float32)
        with _MatmulFlops() as every_row:  # validate=False: nothing read back, every row computed
            want = _grads(lambda h, w: loss(h, w, FusedOptions(validate=False)), hidden, weight, torch.float32)
        assert gathered.flops * mask.numel() == every_row.flops * kept, name
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)
        assert (got[1].reshape(-1, D)[~mask.reshape(-1)] == 0).all(), name  # exact zeros


# --- a mask for token log-probs ------------------------------------------------------------------------------------

_ALL_STATS = AuxRequest(entropy=True, log_sum_sq_probs=True, mean_logits=True, is_top1=True)


def _masked_case(seed=10):
    """(3, 29) tokens, a bias, a random mask with ~50% False, random upstream weights for the log-prob and entropy."""
    hidden, weight, ids, _, g = _inputs(3, 29, seed=seed)
    bias = torch.randn(V, generator=g, dtype=torch.float64)
    mask = torch.rand(ids.shape, generator=g) < 0.5
    up_lp, up_ent = (torch.randn(ids.shape, generator=g, dtype=torch.float64) for _ in range(2))
    return hidden, weight, bias, ids, mask, up_lp, up_ent


def _masked_reference(hidden, weight, bias, ids, mask):
    """Unfused, written from the docstring: every row computed, the masked ones set to 0 after."""
    z = (hidden @ weight.T + bias).to(torch.promote_types(hidden.dtype, torch.float32))
    logp_all = z.log_softmax(-1)
    lp = logp_all.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    stats = ((2 * logp_all).logsumexp(-1), z.mean(-1), z.argmax(-1) == ids)
    zero = torch.zeros((), dtype=lp.dtype)
    return torch.where(mask, lp, zero), torch.where(mask, ent, zero), tuple(
        torch.where(mask, s, torch.zeros((), dtype=s.dtype)) for s in stats)


def _masked_run(fn, hidden, weight, bias, dtype, up_lp, up_ent):
    """fn(h, w, b) -> (logprobs, entropy, stats or None): the values, the stats and grads of hidden, weight, bias
    for the objective sum(up_lp * logprobs + up_ent * entropy)."""
    h, w, b = (t.detach().to(dtype).requires_grad_() for t in (hidden, weight, bias))
    lp, ent, stats = fn(h, w, b)
    ((lp.double() * up_lp).sum() + (ent.double() * up_ent).sum()).backward()
    return (lp.detach(), ent.detach(), h.grad, w.grad, b.grad), stats


def _fused_masked(ids, mask, options=None, aux=False):
    def fused(h, w, b):
        if aux:
            lp, out = linear_token_logprobs(h, w, ids, mask=mask, bias=b, return_aux=_ALL_STATS, options=options)
            return lp, out.entropy, (out.log_sum_sq_probs, out.mean_logits, out.is_top1)
        lp, ent = linear_token_logprobs(h, w, ids, mask=mask, bias=b, return_entropy=True, options=options)
        return lp, ent, None
    return fused


def _check_masked(got, stats, hidden, weight, bias, ids, mask):
    lp, ent, want_stats = _masked_reference(hidden, weight, bias, ids, mask)
    for g, w in zip(got[:2], (lp, ent)):
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-5)
    assert (got[0][~mask] == 0).all() and (got[1][~mask] == 0).all()          # exact zeros
    assert (got[2][~mask] == 0).all()                                          # grad_hidden: exact zeros
    if stats is not None:
        for g, w in zip(stats[:2], want_stats[:2]):
            torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-5)
            assert (g[~mask] == 0).all()
        assert torch.equal(stats[2], want_stats[2]) and not stats[2][~mask].any()


@pytest.mark.parametrize("mode", ["validated", "validate=False", "aux", "aux, validate=False", "int mask"])
def test_logprob_mask_matches_unfused(mode):
    """Masked tokens: log-prob, entropy and statistics 0, an exact 0 gradient to their hidden rows and none to the
    weight or bias, the kept tokens as unfused, whether the masked rows are gathered out (validated) or computed
    and set to 0 (validate=False: nothing read back)."""
    hidden, weight, bias, ids, mask, up_lp, up_ent = _masked_case()
    options = FusedOptions(chunk_size=16, validate="validate=False" not in mode)
    given = mask.to(torch.int32) if mode == "int mask" else mask
    got, stats = _masked_run(_fused_masked(ids, given, options, aux="aux" in mode), hidden, weight, bias,
                             torch.float32, up_lp, up_ent)
    gold, _ = _masked_run(lambda h, w, b: (*_masked_reference(h, w, b, ids, mask)[:2], None), hidden, weight, bias,
                          torch.float64, up_lp, up_ent)
    _close(got[2:], gold[2:])                                                  # grad hidden, weight, bias
    _check_masked(got, stats, hidden, weight, bias, ids, mask)


def test_logprob_mask_inside_user_compile_fullgraph():
    """Inside torch.compile nothing is read back, so every row is computed; the masked ones still come back 0, with
    an exact 0 gradient, and the rest as unfused (the AuxOutput too)."""
    torch._dynamo.reset()
    hidden, weight, bias, ids, mask, up_lp, up_ent = _masked_case(seed=11)
    gold, _ = _masked_run(lambda h, w, b: (*_masked_reference(h, w, b, ids, mask)[:2], None), hidden, weight, bias,
                          torch.float64, up_lp, up_ent)
    for aux in (False, True):
        compiled = torch.compile(_fused_masked(ids, mask, FusedOptions(chunk_size=16), aux=aux), fullgraph=True,
                                 backend="aot_eager")
        got, stats = _masked_run(compiled, hidden, weight, bias, torch.float32, up_lp, up_ent)
        _close(got[2:], gold[2:])
        _check_masked(got, stats, hidden, weight, bias, ids, mask)
    torch._dynamo.reset()


def test_masked_logprobs_are_not_computed():
    """The matmul work is the kept fraction of every row's (the mask's count comes back with the token-id check's
    one read-back); without the read-back (validate=False) every row is computed, to the same result. An all-False
    mask computes nothing and gives zeros."""
    from test_cross_entropy import _MatmulFlops

    hidden, weight, ids, _, g = _inputs(4, 40, seed=12, dtype=torch.float32)
    mask = torch.rand(ids.shape, generator=g) < 0.5
    kept = int(mask.sum())

    def logprobs(options, mask=mask):
        return lambda h, w: linear_token_logprobs(h, w, ids, mask=mask, options=options).sum()

    with _MatmulFlops() as gathered:
        got = _grads(logprobs(FusedOptions(chunk_size=16)), hidden, weight, torch.float32)
    with _MatmulFlops() as every_row:
        want = _grads(logprobs(FusedOptions(chunk_size=16, validate=False)), hidden, weight, torch.float32)
    assert 0 < kept < mask.numel() and gathered.flops * mask.numel() == every_row.flops * kept
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    assert (got[1][~mask] == 0).all()
    with _MatmulFlops() as nothing:
        value, grad_h, grad_w = _grads(logprobs(None, torch.zeros_like(mask)), hidden, weight, torch.float32)
    assert nothing.flops == 0 and value == 0 and not grad_h.any() and not grad_w.any()


def test_logprob_mask_module_form():
    hidden, weight, ids, _, g = _inputs(2, 9, seed=13, dtype=torch.float32)
    mask = torch.rand(ids.shape, generator=g) < 0.5
    got = LinearTokenLogprobs(return_entropy=True)(hidden, weight, ids, mask=mask)
    want = linear_token_logprobs(hidden, weight, ids, mask=mask, return_entropy=True)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert (got[0][~mask] == 0).all() and (got[0][mask] != 0).all()


def test_logprob_mask_errors():
    hidden, weight, ids, mask, _ = _inputs(2, 9, seed=14, dtype=torch.float32)
    bad = [
        (mask.float(), TypeError, "linear_token_logprobs: mask must be a bool or 0/1 integer tensor, got "
                                  "torch.float32. Pass mask.bool(), or multiply the log-probs by a float weight."),
        (mask[:, :8], ValueError, "linear_token_logprobs: mask must have the leading shape of hidden (2, 9), got "
                                  "(2, 8)."),
        (mask[..., None], ValueError, "linear_token_logprobs: mask must have token_ids' shape (2, 9), got "
                                      "(2, 9, 1)."),
        (mask.tolist(), TypeError, "linear_token_logprobs: mask must be a Tensor, got list."),
        (mask.to(torch.complex64), TypeError, "linear_token_logprobs: mask must be a bool or 0/1 integer tensor, "
                                              "got torch.complex64."),
    ]
    for value, error, message in bad:
        with pytest.raises(error) as info:
            linear_token_logprobs(hidden, weight, ids, mask=value)
        assert str(info.value).startswith(message), str(info.value)
    with pytest.raises(TypeError, match="mask must be a bool or 0/1 integer tensor"):
        LinearTokenLogprobs()(hidden, weight, ids, mask=mask.double())
