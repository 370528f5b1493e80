"""Inside a user's torch.compile(fullgraph=True); bounded recompiles as N changes; no host-device syncs."""
import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounter

from lce_compile import FusedOptions, fused_loss, linear_cross_entropy
from lce_compile.testing import forward_backward as run, make_inputs, unfused_cross_entropy
from memtrack import InsideFusedOps

SMALL = FusedOptions(chunk_size=16)
LOSSES = {
    "linear_cross_entropy": lambda h, w, t: linear_cross_entropy(h, w, t, softcap=5.0, z_loss=1e-3, options=SMALL),
    "fused_loss(F.cross_entropy)": lambda h, w, t: fused_loss(F.cross_entropy)(
        h, w, t, label_smoothing=0.1, options=SMALL),
}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("name", list(LOSSES))
def test_inside_user_compile_fullgraph(name):
    loss_fn = LOSSES[name]
    compiled = torch.compile(lambda h, w, t: 2 * loss_fn(h, w, t), fullgraph=True, backend="aot_eager")
    hidden, weight, targets = make_inputs((3, 25), 16, 97, seed=1)
    want = run(lambda h, w, t: 2 * loss_fn(h, w, t), hidden, weight, targets)
    got = run(compiled, hidden, weight, targets)
    for g, w_ in zip(got, want):
        torch.testing.assert_close(g, w_)


def test_inside_user_compile_default_options():
    compiled = torch.compile(lambda h, w, t: linear_cross_entropy(h, w, t), fullgraph=True, backend="aot_eager")
    hidden, weight, targets = make_inputs(30, 8, 29, seed=5)
    for g, w_ in zip(run(compiled, hidden, weight, targets), run(linear_cross_entropy, hidden, weight, targets)):
        torch.testing.assert_close(g, w_)


def test_inside_user_compile_with_inductor():
    compiled = torch.compile(LOSSES["linear_cross_entropy"], fullgraph=True)
    hidden, weight, targets = make_inputs(50, 16, 97, seed=2)
    gold = run(lambda h, w, t: unfused_cross_entropy(h, w, t, softcap=5.0, z_loss=1e-3),
               hidden, weight, targets, torch.float64)
    for g, w_ in zip(run(compiled, hidden, weight, targets), gold):
        torch.testing.assert_close(g, w_.float())


def test_recompiles_are_bounded_when_tokens_change():
    counter = CompileCounter()
    loss_fn = LOSSES["linear_cross_entropy"]
    compiled = torch.compile(loss_fn, fullgraph=True, backend=counter)
    _, weight, _ = make_inputs(1, 16, 97)
    weight.requires_grad_()
    sizes = list(range(17, 260, 7))  # 35 token counts, 17..255: 1 to 16 chunks of 16
    for n in sizes:
        hidden, _, targets = make_inputs(n, 16, 97, seed=n)
        hidden.requires_grad_()
        loss = compiled(hidden, weight, targets)
        loss.backward()
        torch.testing.assert_close(loss, unfused_cross_entropy(hidden, weight, targets, softcap=5.0, z_loss=1e-3))
    # chunk counts are powers of two (2, 4, 8, 16 here), plus the first, static-shape compile
    assert counter.frame_count <= 6, f"{counter.frame_count} compiles for {len(sizes)} token counts"


def test_compiled_chunk_functions_match_eager():
    opts = FusedOptions(chunk_size=16, compile=True)
    hidden, weight, targets = make_inputs((2, 21), 16, 61, seed=3)
    gold = run(lambda h, w, t: unfused_cross_entropy(h, w, t, label_smoothing=0.1), hidden, weight, targets,
               torch.float64)
    got = run(lambda h, w, t: linear_cross_entropy(h, w, t, label_smoothing=0.1, options=opts),
              hidden, weight, targets)
    for g, w_ in zip(got, gold):
        torch.testing.assert_close(g, w_.float())


class _SyncCounter(InsideFusedOps):
    """Counts reads of a tensor's value back to the host (.item(), .tolist(), bool(tensor))."""

    def __init__(self):
        super().__init__()
        self.syncs = 0

    def dispatch(self, func, args, kwargs):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.syncs += 1
        return func(*args, **kwargs)


@pytest.mark.parametrize("n", [40, 400])
def test_no_host_reads_in_the_chunk_loop(n):
    hidden, weight, targets = make_inputs(n, 16, 97, seed=4)
    hidden.requires_grad_()
    counts = {}
    for validate in (False, True):
        with _SyncCounter() as counter:
            linear_cross_entropy(hidden, weight, targets, options=FusedOptions(chunk_size=16, validate=validate),
                                 ).backward()
        counts[validate] = counter.syncs
    assert counts[False] == 0
    assert counts[True] <= 2  # the one target-range check before the loop, whatever n is


class _ReadBacksAndGathers(InsideFusedOps):
    """Counts reads of a value by the host (the ops and, as CPU tensors read without dispatching, the methods) and
    gathers of kept rows (nonzero_static, sized by the read-back count)."""

    def __init__(self, monkeypatch):
        super().__init__()
        self.reads, self.gathers = 0, 0
        for name in ("item", "tolist"):
            monkeypatch.setattr(torch.Tensor, name, self._counting(getattr(torch.Tensor, name)))

    def _counting(self, method):
        def read(tensor, *args, **kwargs):
            self.reads += 1
            return method(tensor, *args, **kwargs)
        return read

    def dispatch(self, func, args, kwargs):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads += 1
        if func.overloadpacket is torch.ops.aten.nonzero_static:
            self.gathers += 1
        return func(*args, **kwargs)


def test_no_read_back_while_a_cuda_graph_captures(monkeypatch):
    """While the current CUDA stream captures a graph (checks.stream_capturing, made to say so here) a read-back is
    illegal: the target check reads nothing, as inside torch.compile, so the kept rows are not gathered and every
    row is computed, to the unfused value and gradients."""
    from lce_compile import checks

    hidden, weight, targets = make_inputs((4, 50), 16, 97, seed=6, ignored=0.5)
    gold = run(unfused_cross_entropy, hidden, weight, targets, torch.float64)
    for capturing in (False, True):
        with monkeypatch.context() as patch:
            patch.setattr(checks, "stream_capturing", lambda device, capturing=capturing: capturing)
            with _ReadBacksAndGathers(patch) as seen:
                got = run(lambda h, w, t: linear_cross_entropy(h, w, t, options=SMALL), hidden, weight, targets)
        for g, w_ in zip(got, gold):
            torch.testing.assert_close(g, w_.float())
        assert (got[1][targets == -100] == 0).all()
        # outside a capture: the target check's one read-back, then the kept rows gathered
        assert (seen.reads, seen.gathers) == ((0, 0) if capturing else (1, 1)), (capturing, seen.reads, seen.gathers)


def test_stream_capturing_is_cuda_only(monkeypatch):
    """checks.stream_capturing asks CUDA about a CUDA device only (or, with no device, if CUDA is there)."""
    from lce_compile import checks

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert not checks.stream_capturing(torch.device("cpu")) and not checks.stream_capturing("meta")
    assert checks.stream_capturing(torch.device("cuda", 1)) and checks.stream_capturing("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not checks.stream_capturing()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert checks.stream_capturing()


def test_distillation_and_grpo_inside_user_compile_fullgraph():
    from lce_compile import linear_grpo_loss, linear_kd_loss
    from lce_compile.testing import unfused_kd

    hidden, weight, targets = make_inputs(300, 32, 501, seed=11)
    t_hidden, t_weight, _ = make_inputs(300, 48, 501, seed=12)
    opts = FusedOptions(chunk_size=128)
    kd = torch.compile(lambda h, w: linear_kd_loss(h, w, t_hidden, t_weight, targets, kind="jsd", options=opts),
                       fullgraph=True)
    got = run(lambda h, w, t: kd(h, w), hidden, weight, targets)
    gold = run(lambda h, w, t: unfused_kd(h, w, t_hidden.double(), t_weight.double(), t, kind="jsd"),
               hidden, weight, targets, torch.float64)
    for g, want in zip(got, gold):
        torch.testing.assert_close(g.double(), want, rtol=1e-4, atol=1e-6)
    gen = torch.Generator().manual_seed(13)
    ids, mask = torch.randint(0, 501, (3, 100), generator=gen), torch.rand(3, 100, generator=gen) < 0.8
    adv = torch.randn(3, generator=gen)

    def grpo(h, w, t):
        return linear_grpo_loss(h.view(3, 100, -1), w, ids, mask, adv, beta=0.0, options=opts)

    compiled = torch.compile(grpo, fullgraph=True)
    for got_c, want in zip(run(compiled, hidden, weight, targets), run(grpo, hidden, weight, targets)):
        torch.testing.assert_close(got_c, want, rtol=1e-4, atol=1e-6)


def _grid():
    """Every loss and option, as (name, fn(hidden (4, 30, D), weight) -> a scalar to differentiate)."""
    from lce_compile import AuxRequest, linear_dpo_loss, linear_grpo_loss, linear_kd_loss, linear_token_logprobs

    gen = torch.Generator().manual_seed(21)
    targets = torch.randint(0, 97, (4, 30), generator=gen)
    targets[:, :5] = -100
    class_weight = torch.rand(97, generator=gen) + 0.5
    t_hidden, t_weight = torch.randn(4, 30, 24, generator=gen), torch.randn(97, 24, generator=gen)
    mask, adv = torch.rand(4, 30, generator=gen) < 0.8, torch.randn(4, generator=gen)
    old, ref = -torch.rand(4, 30, generator=gen) * 5, -torch.rand(4, 30, generator=gen) * 5
    upstream = torch.randn(4, 30, generator=gen)

    def ce(**kw):
        return lambda h, w: linear_cross_entropy(h, w, targets, options=SMALL, **kw)

    def row_sq(logits, targets):  # a user's row function
        return (logits.float().softmax(-1) ** 2).sum(-1) * (targets >= 0)

    def aux(h, w):
        loss, out = linear_cross_entropy(h, w, targets, return_aux=AuxRequest(loss=True, lse=True, correct=True),
                                         options=SMALL)
        return loss + out.lse.sum() * 0 + out.correct.sum() * 0 + out.loss.sum()

    def logprobs(h, w):
        logp, entropy = linear_token_logprobs(h, w, targets.clamp(min=0), return_entropy=True, options=SMALL)
        return (logp * upstream).sum() + entropy.sum()

    def grpo(level):
        return lambda h, w: linear_grpo_loss(h, w, targets.clamp(min=0), mask, adv, old_logprobs=old,
                                             ref_logprobs=ref, beta=0.04, importance_sampling_level=level,
                                             options=SMALL)

    return {
        "ce": ce(), "ce_class_weight": ce(class_weight=class_weight), "ce_smoothing": ce(label_smoothing=0.1),
        "ce_softcap": ce(softcap=5.0), "ce_logit_scale": ce(logit_scale=0.5), "ce_z_loss": ce(z_loss=1e-3),
        "ce_sum": ce(reduction="sum"), "ce_z_loss_class_weight": ce(z_loss=1e-3, class_weight=class_weight),
        "ce_none": lambda h, w: (linear_cross_entropy(h, w, targets, reduction="none", options=SMALL)
                                 * upstream).sum(),
        "ce_return_aux": aux,
        "fused_loss(F.cross_entropy)": lambda h, w: fused_loss(F.cross_entropy)(
            h, w, targets, weight=class_weight, label_smoothing=0.1, options=SMALL),
        "fused_loss(F.nll_loss)": lambda h, w: fused_loss(F.nll_loss)(h, w, targets, options=SMALL),
        "fused_loss(user rows)": lambda h, w: fused_loss(row_sq)(h, w, targets, options=SMALL).sum(),
        **{f"kd_{kind}": (lambda kind: lambda h, w: linear_kd_loss(h, w, t_hidden, t_weight, targets, kind=kind,
                                                                  options=SMALL))(kind)
           for kind in ("forward_kl", "reverse_kl", "jsd")},
        "logprobs_entropy": logprobs,
        "grpo_token": grpo("token"), "grpo_sequence": grpo("sequence"),
        "dpo": lambda h, w: linear_dpo_loss(h, w, targets.clamp(min=0), mask, ref, options=SMALL),
    }


GRID = _grid()


@pytest.mark.parametrize("name", list(GRID))
def test_every_loss_inside_user_compile_gives_the_eager_result(name):
    """fullgraph=True (no graph break), Dynamo + AOTAutograd: the fused operator is one node, whose body is the
    eager engine, so the compiled call equals the eager one (up to the order of the weight gradient's sums: an
    eager call with ignored targets computes the kept rows only, which it counts in its one read-back, and a
    compiled one, which never reads back, computes every row)."""
    loss_fn = GRID[name]
    hidden, weight, _ = make_inputs((4, 30), 16, 97, seed=2)
    eager = run(lambda h, w, t: loss_fn(h, w), hidden, weight, None)
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    got = run(lambda h, w, t: compiled(h, w), hidden, weight, None)
    for g, e in zip(got, eager):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def _graph_tensor_sizes(loss_fn, hidden, weight):
    """The largest tensor (elements) in the forward and backward graphs that Inductor would get."""
    from torch._dynamo.backends.common import aot_autograd

    largest = []

    def record(gm, example_inputs):
        sizes = [n.meta["val"].numel() for n in gm.graph.nodes
                 if isinstance(n.meta.get("val"), torch.Tensor)]
        largest.append(max(sizes))
        return gm.forward

    compiled = torch.compile(loss_fn, fullgraph=True, backend=aot_autograd(fw_compiler=record, bw_compiler=record))
    compiled(hidden, weight).backward()
    return largest


@pytest.mark.parametrize("name", ["ce", "ce_none", "kd_jsd", "logprobs_entropy", "grpo_token"])
def test_compiled_graphs_hold_no_n_by_v_tensor(name):
    """What a user's torch.compile gets to optimize: neither its forward nor its backward graph has a tensor
    as large as the logits (N x V = 120 x 97), only the operator's inputs, outputs and gradients."""
    hidden, weight, _ = make_inputs((4, 30), 16, 97, seed=2)
    hidden.requires_grad_(), weight.requires_grad_()
    largest = _graph_tensor_sizes(GRID[name], hidden, weight)
    # the largest inputs: the teacher's hidden states (120 x 24) and weight (97 x 24)
    assert len(largest) == 2 and max(largest) <= 120 * 24 < 120 * 97 // 4, largest


@pytest.mark.parametrize("loss", ["cross_entropy", "kd_without_targets"])
def test_six_token_counts_compile_at_most_three_graphs(loss):
    """Packing / variable-length batches: N changes every step; the chunking is decided inside the operator (and a
    mean over every row divides by N without reading it as a constant)."""
    from lce_compile import linear_kd_loss

    _, t_weight, _ = make_inputs(1, 8, 97, seed=1)
    losses = {"cross_entropy": lambda h, w, t, th: linear_cross_entropy(h, w, t, options=SMALL),
              "kd_without_targets": lambda h, w, t, th: linear_kd_loss(h, w, th, t_weight, options=SMALL)}
    counter = CompileCounter()
    compiled = torch.compile(losses[loss], fullgraph=True, backend=counter)
    _, weight, _ = make_inputs(1, 16, 97)
    weight.requires_grad_()
    for n in (37, 120, 64, 301, 75, 1000):
        hidden, _, targets = make_inputs(n, 16, 97, seed=n)
        t_hidden = make_inputs(n, 8, 97, seed=n + 1)[0]
        hidden.requires_grad_()
        got = compiled(hidden, weight, targets, t_hidden)
        got.backward()
        torch.testing.assert_close(got, losses[loss](hidden, weight, targets, t_hidden))
    assert counter.frame_count <= 3, f"{counter.frame_count} graphs for 6 token counts"


def test_float_options_passed_into_the_compiled_step():
    """A float option that is an input of the user's compiled step (a temperature schedule) gives the right values
    for every value. It is a constant of the graph (the option checks branch on it, as the unfused code's would),
    so each new value compiles once."""
    from lce_compile import linear_token_logprobs

    counter = CompileCounter()
    compiled = torch.compile(lambda h, w, t, temp: linear_token_logprobs(h, w, t, temperature=temp, options=SMALL),
                             fullgraph=True, backend=counter)
    hidden, weight, targets = make_inputs(50, 16, 97, seed=6)
    targets = targets.clamp(min=0)
    for temperature in (1.0, 0.7, 1.3, 0.9):
        got = compiled(hidden, weight, targets, temperature)
        torch.testing.assert_close(got, linear_token_logprobs(hidden, weight, targets, temperature=temperature))
    assert counter.frame_count <= 4, f"{counter.frame_count} graphs for 4 temperatures"


def test_autocast_inside_user_compile_gives_the_eager_result():
    """Under torch.autocast the front door casts the inputs before the operator, traced like the unfused code's
    casts; the operator's body runs with autocast off."""
    def loss_fn(h, w, t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return linear_cross_entropy(h, w, t, label_smoothing=0.1, options=SMALL)

    hidden, weight, targets = make_inputs((3, 25), 16, 97, seed=7)
    eager = run(loss_fn, hidden, weight, targets)
    got = run(torch.compile(loss_fn, fullgraph=True, backend="aot_eager"), hidden, weight, targets)
    for g, e in zip(got, eager):
        assert g.dtype == e.dtype
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-7)


def test_a_single_unbatched_token_inside_user_compile():
    from lce_compile import linear_token_logprobs

    hidden, weight, _ = make_inputs(1, 16, 97, seed=9)
    hidden, target = hidden[0], torch.tensor(5)

    def loss_fn(h, w, t):
        logp, entropy = linear_token_logprobs(h, w, t, return_entropy=True)
        return linear_cross_entropy(h, w, t, reduction="none") + logp + entropy

    got = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")(hidden, weight, target)
    assert got.shape == ()
    torch.testing.assert_close(got, loss_fn(hidden, weight, target))
