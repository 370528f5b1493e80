"""integrations.trl: the five outputs and their gradients match TRL's own chunked log-prob function; install()
swaps the hook every trainer looks up, uninstall() restores it, a different hook is refused."""
import pytest
import torch

trl_utils = pytest.importorskip("trl.trainer.utils")
from lce_compile import FusedOptions  # noqa: E402
from lce_compile.testing import assert_no_less_accurate  # noqa: E402
from lce_compile.integrations import trl as lce_trl  # noqa: E402

TRL_FUNCTION = trl_utils._ChunkedLogProbFunction
OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
N, D, V = 150, 24, 211


def _inputs(dtype, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g).to(dtype)
    weight = (torch.randn(V, D, generator=g) * 0.6).to(dtype)
    b = (torch.randn(V, generator=g) * 0.5).to(dtype) if bias else None
    targets = torch.randint(0, V, (N,), generator=g)
    targets[:10] = (hidden[:10].float() @ weight.float().T).argmax(-1)  # some targets are the top-1
    ups = torch.randn(N, generator=g), torch.randn(N, generator=g)
    return hidden, weight, b, targets, ups


def _run(function, hidden, weight, bias, targets, ups, kw, outputs, autocast):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = function.apply(*leaves, targets, kw["temperature"], 64, kw["softcap"], kw["logit_scale"], outputs)
    objective = (out[0] * ups[0]).sum() + (0 if out[1] is None else (out[1] * ups[1]).sum())
    objective.backward()
    return out, [t.grad for t in leaves if t is not None]


@pytest.mark.parametrize("kw", [dict(temperature=1.0, softcap=None, logit_scale=1.0),
                                dict(temperature=0.7, softcap=3.0, logit_scale=0.5)], ids=["plain", "transformed"])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("setting", ["fp32", "bf16_autocast"])
def test_five_outputs_and_gradients_match_trl(kw, bias, setting):
    hidden, weight, b, targets, ups = _inputs(torch.float32, bias)
    autocast = setting == "bf16_autocast"
    want, want_grads = _run(TRL_FUNCTION, hidden, weight, b, targets, ups, kw, OUTPUTS, autocast)
    got, got_grads = _run(lce_trl.FusedLogProbFunction, hidden, weight, b, targets, ups, kw, OUTPUTS, autocast)
    assert not any(t.requires_grad for t in got[2:]) and got[0].requires_grad and got[1].requires_grad
    assert torch.equal(got[4], want[4]) or autocast  # is_top1; under autocast near-ties may round apart
    assert got[4].any()
    floats = [*got[:4], *got_grads], [*want[:4], *want_grads]
    names = ("log_probs", *OUTPUTS[:3], "grad_hidden", "grad_weight", "grad_bias")
    if not autocast:  # fp32: the same numbers up to summation order (over V, and over N for the gradients)
        for name, g, w in zip(names, *floats):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=5e-5, msg=lambda m: f"{name}: {m}")
        return
    # bf16 logits under autocast: no further from an fp64 run of TRL's function than the unfused PyTorch code under
    # the same autocast. (TRL's kernel keeps fp32 gradient accumulators, so its grad_hidden is ~15% closer still.)
    gold, gold_grads = _run(TRL_FUNCTION, *(t.double() if t is not None else None for t in (hidden, weight, b)),
                            targets, ups, kw, OUTPUTS, False)
    ref, ref_grads = _run(_Unfused, hidden, weight, b, targets, ups, kw, OUTPUTS, True)
    assert_no_less_accurate(floats[0], [*ref[:4], *ref_grads], [*gold[:4], *gold_grads], factor=1.1, names=names)


class _Unfused:
    """The five outputs from full logits, written plainly (the unfused code TRL's function replaces)."""

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, chunk_size, softcap, logit_scale, outputs):
        z = torch.nn.functional.linear(hidden, weight, bias).float() * logit_scale
        z = (softcap * torch.tanh(z / softcap) if softcap else z) / temperature
        logp_all = z.log_softmax(-1)
        with torch.no_grad():
            stats = ((2 * logp_all).logsumexp(-1), z.mean(-1), z.argmax(-1) == targets)
        return (logp_all.gather(-1, targets[:, None])[:, 0], -(logp_all.exp() * logp_all).sum(-1), *stats)


def test_unrequested_outputs_are_none_and_no_entropy_gradient_is_fine():
    hidden, weight, b, targets, ups = _inputs(torch.float32, False, seed=1)
    kw = dict(temperature=1.0, softcap=None, logit_scale=1.0)
    want, want_grads = _run(TRL_FUNCTION, hidden, weight, b, targets, ups, kw, (), False)
    got, got_grads = _run(lce_trl.FusedLogProbFunction, hidden, weight, b, targets, ups, kw, (), False)
    assert all(x is None for x in got[1:]) and all(x is None for x in want[1:])
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=5e-5)


def test_install_uninstall_use_and_refusal(monkeypatch):
    assert trl_utils._ChunkedLogProbFunction is TRL_FUNCTION
    lce_trl.install(FusedOptions(chunk_size=32))
    try:
        assert trl_utils._ChunkedLogProbFunction is lce_trl.FusedLogProbFunction
        lce_trl.install()  # again: only the options change
    finally:
        lce_trl.uninstall()
    assert trl_utils._ChunkedLogProbFunction is TRL_FUNCTION
    with lce_trl.use():
        assert trl_utils._ChunkedLogProbFunction is lce_trl.FusedLogProbFunction
    assert trl_utils._ChunkedLogProbFunction is TRL_FUNCTION
    lce_trl.uninstall()  # harmless when not installed

    class Other(torch.autograd.Function):
        @staticmethod
        def forward(ctx, hidden, weight, targets):
            return hidden

    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", Other)
    with pytest.raises(RuntimeError, match=r"_ChunkedLogProbFunction.forward takes \('hidden', 'weight', 'targets'\)"):
        lce_trl.install()
    assert trl_utils._ChunkedLogProbFunction is Other
    monkeypatch.delattr(trl_utils, "_ChunkedLogProbFunction")
    with pytest.raises(RuntimeError, match="has no trl.trainer.utils._ChunkedLogProbFunction"):
        lce_trl.install()


def test_grpo_defaults_follow_trl_grpo_config():
    import inspect

    from trl import GRPOConfig

    from lce_compile import linear_grpo_loss
    config = GRPOConfig(output_dir="unused", report_to=[], use_cpu=True, bf16=False)
    defaults = {k: p.default for k, p in inspect.signature(linear_grpo_loss).parameters.items()}
    assert defaults["beta"] == config.beta and defaults["loss_type"] == config.loss_type
    assert defaults["epsilon_low"] == config.epsilon and defaults["epsilon_high"] == (config.epsilon_high or config.epsilon)
    assert defaults["importance_sampling_level"] == config.importance_sampling_level
    assert defaults["temperature"] == config.temperature


def test_zero3_partitioned_trained_head_refused():
    hidden, weight, b, targets, _ = _inputs(torch.float32, False, seed=2)
    weight = weight.requires_grad_()
    weight.ds_id = 7  # what DeepSpeed ZeRO-3 sets on a partitioned parameter
    with pytest.raises(NotImplementedError, match="ZeRO-3 partitioned head that trains is not supported"):
        lce_trl.FusedLogProbFunction.apply(hidden, weight, None, targets, 1.0, 64, None, 1.0, ())
    with torch.no_grad():  # a frozen reference model under ZeRO-3 computes in forward only: fine
        lce_trl.FusedLogProbFunction.apply(hidden, weight, None, targets, 1.0, 64, None, 1.0, ())
