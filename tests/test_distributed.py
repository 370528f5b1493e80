"""Vocabulary-parallel losses and FSDP2 on two CPU processes (gloo), against single-process fp64 references.

Every rank builds the same full inputs from one seed, computes the unfused reference on them, and the fused loss
on its shard; the loss, its shard of the weight gradient and the (summed) hidden gradient must match. Each case
runs eagerly and inside ``torch.compile(fullgraph=True)`` (aot_eager: Dynamo and AOTAutograd trace the
collectives and derive the backward, which is where a gradient off by the world size would appear).
"""
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lce_compile import (AuxRequest, FusedOptions, fused_loss, linear_cross_entropy, linear_dpo_loss,
                         linear_grpo_loss, linear_kd_loss, linear_token_logprobs)
from lce_compile.parallel import VocabShard, _map_tensors, call_head
from lce_compile.testing import unfused_cross_entropy, unfused_kd
from test_rl import ref_grpo, ref_logprobs

if not dist.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor, init_device_mesh

WORLD, N, D, V, D_T = 2, 24, 16, 103, 12   # V = 103: uneven shards (52 + 51 rows)
CHUNKS = FusedOptions(chunk_size=7)       # several chunks, the last one short


def _spawn(worker, *args):
    with tempfile.TemporaryDirectory() as tmp:
        torch.multiprocessing.spawn(_init, args=(worker, os.path.join(tmp, "rdzv"), args), nprocs=WORLD)


def _init(rank, worker, path, args):
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        worker(rank, *args)
        dist.barrier()  # both ranks done before either tears the group down
    finally:
        dist.destroy_process_group()
    # Every check passed. Leave without the interpreter's teardown, where a spawned rank was seen to abort now
    # and then ("terminate called without an active exception", about 1 run in 10 on 2 cores) after its work.
    os._exit(0)


# ---- the cases: (fused objective, reference objective); each returns (scalar, detached outputs to compare) ----

def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = {"hidden": torch.randn(N, D, generator=g, dtype=torch.float64),
         "weight": torch.randn(V, D, generator=g, dtype=torch.float64) * (3 / D ** 0.5),
         "bias": torch.randn(V, generator=g, dtype=torch.float64),
         "targets": torch.randint(0, V, (N,), generator=g),
         "class_weight": torch.rand(V, generator=g, dtype=torch.float64) + 0.5,
         "upstream": torch.randn(N, generator=g, dtype=torch.float64),
         "upstream2": torch.randn(N, generator=g, dtype=torch.float64),
         "teacher_hidden": torch.randn(N, D_T, generator=g, dtype=torch.float64),
         "teacher_weight": torch.randn(V, D_T, generator=g, dtype=torch.float64) * (3 / D_T ** 0.5),
         "mask": torch.rand(4, N // 4, generator=g) < 0.8,
         "advantages": torch.randn(4, generator=g, dtype=torch.float64),
         "old": -torch.rand(4, N // 4, generator=g, dtype=torch.float64) * 5,
         "ref": -torch.rand(4, N // 4, generator=g, dtype=torch.float64) * 5}
    x["targets"][::5] = -100
    # a tie across the two shards at the maximum: is_top1 / correct must take the first index (10, not 60)
    x["weight"][60] = x["weight"][10]
    x["hidden"][1] = x["weight"][10] * 3
    x["targets"][1] = 10
    return x


def _ce_options(h, w, x, b=None, **kw):
    return dict(class_weight=x["class_weight"], label_smoothing=0.1, z_loss=1e-3, softcap=5.0, logit_scale=0.7)


CASES = {
    "ce_mean": (lambda h, w, x, b: (linear_cross_entropy(h, w, x["targets"], options=CHUNKS), ()),
                lambda h, w, x, b: (unfused_cross_entropy(h, w, x["targets"]), ())),
    "ce_options_bias": (
        lambda h, w, x, b: (linear_cross_entropy(h, w, x["targets"], bias=b, options=CHUNKS, **_ce_options(h, w, x)),
                            ()),
        lambda h, w, x, b: (unfused_cross_entropy(h, w, x["targets"], bias=b, **_ce_options(h, w, x)), ())),
    "ce_none_aux": (
        lambda h, w, x, b: _none_aux(linear_cross_entropy(h, w, x["targets"], reduction="none", options=CHUNKS,
                                                          return_aux=AuxRequest(lse=True, correct=True)), x),
        lambda h, w, x, b: _ref_none_aux(h, w, x)),
    "logprobs_entropy_aux": (lambda h, w, x, b: _logprobs(h, w, x), lambda h, w, x, b: _ref_logprobs(h, w, x)),
    "grpo_token": (
        lambda h, w, x, b: (linear_grpo_loss(h.view(4, -1, D), w, x["targets"].clamp(min=0).view(4, -1), x["mask"],
                                             x["advantages"], old_logprobs=x["old"], ref_logprobs=x["ref"], beta=0.04,
                                             loss_type="grpo", options=CHUNKS), ()),
        lambda h, w, x, b: (ref_grpo(h.view(4, -1, D), w, x["targets"].clamp(min=0).view(4, -1), x["mask"],
                                     x["advantages"], x["old"], x["ref"], beta=0.04, loss_type="grpo"), ())),
    "grpo_sequence": (
        lambda h, w, x, b: (linear_grpo_loss(h.view(4, -1, D), w, x["targets"].clamp(min=0).view(4, -1), x["mask"],
                                             x["advantages"], old_logprobs=x["old"],
                                             importance_sampling_level="sequence", options=CHUNKS), ()),
        lambda h, w, x, b: (ref_grpo(h.view(4, -1, D), w, x["targets"].clamp(min=0).view(4, -1), x["mask"],
                                     x["advantages"], x["old"], beta=0.0, loss_type="dapo", level="sequence"), ())),
    "dpo": (lambda h, w, x, b: (linear_dpo_loss(h.view(4, -1, D), w, x["targets"].clamp(min=0).view(4, -1),
                                                x["mask"], x["ref"], beta=0.1, options=CHUNKS), ()),
            lambda h, w, x, b: (_ref_dpo(h, w, x), ())),
    "fused_loss_cross_entropy": (
        lambda h, w, x, b: (fused_loss(F.cross_entropy)(h, w, x["targets"], weight=x["class_weight"],
                                                        label_smoothing=0.2, options=CHUNKS), ()),
        lambda h, w, x, b: (F.cross_entropy(h @ w.T, x["targets"], weight=x["class_weight"], label_smoothing=0.2),
                            ())),
    "fused_loss_nll": (
        lambda h, w, x, b: (fused_loss(F.nll_loss)(h, w, x["targets"], weight=x["class_weight"], options=CHUNKS),
                            ()),
        lambda h, w, x, b: (F.nll_loss(h @ w.T, x["targets"], weight=x["class_weight"]), ())),
}
for _kind, _kw in (("forward_kl", {"temperature": 2.0, "hard_weight": 0.3}), ("reverse_kl", {}),
                   ("jsd", {"beta": 0.3})):
    CASES[f"kd_{_kind}"] = (
        lambda h, w, x, b, kind=_kind, kw=_kw: (linear_kd_loss(h, w, x["teacher_hidden"], x["teacher_w"],
                                                               x["targets"], kind=kind, options=CHUNKS, **kw), ()),
        lambda h, w, x, b, kind=_kind, kw=_kw: (unfused_kd(h, w, x["teacher_hidden"], x["teacher_weight"],
                                                           x["targets"], kind=kind, **kw), ()))


def _local(out):
    """DTensor outputs as this rank's (replicated) plain tensors, to combine with plain upstream gradients."""
    return _map_tensors(_plain, out)


def _none_aux(out, x):
    loss, aux = _local(out)
    return (loss * x["upstream"]).sum(), (aux.lse, aux.correct)


def _ref_none_aux(h, w, x):
    loss = unfused_cross_entropy(h, w, x["targets"], reduction="none")
    logits = h @ w.T
    kept = x["targets"] != -100
    return (loss * x["upstream"]).sum(), (logits.logsumexp(-1), (logits.argmax(-1) == x["targets"]) & kept)


_TRANSFORM = {"temperature": 1.5, "softcap": 6.0, "logit_scale": 0.8}


def _logprobs(h, w, x):
    ids = x["targets"].clamp(min=0)
    logp, aux = _local(linear_token_logprobs(h, w, ids, options=CHUNKS, **_TRANSFORM, return_aux=AuxRequest(
        entropy=True, log_sum_sq_probs=True, mean_logits=True, is_top1=True)))
    return ((logp * x["upstream"]).sum() + (aux.entropy * x["upstream2"]).sum(),
            (aux.log_sum_sq_probs, aux.mean_logits, aux.is_top1))


def _ref_logprobs(h, w, x):
    ids = x["targets"].clamp(min=0)
    z = _TRANSFORM["softcap"] * torch.tanh(h @ w.T * _TRANSFORM["logit_scale"] / _TRANSFORM["softcap"])
    z = z / _TRANSFORM["temperature"]
    logp_all = z.log_softmax(-1)
    logp = logp_all.gather(-1, ids[:, None])[:, 0]
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return ((logp * x["upstream"]).sum() + (entropy * x["upstream2"]).sum(),
            ((2 * logp_all).logsumexp(-1), z.mean(-1), z.argmax(-1) == ids))


def _ref_dpo(h, w, x):
    logp, _ = ref_logprobs(h.view(4, -1, D), w, x["targets"].clamp(min=0).view(4, -1))
    rewards = 0.1 * ((logp - x["ref"]) * x["mask"]).sum(-1)
    return -F.logsigmoid(rewards[:2] - rewards[2:]).mean()


# ---- the worker: one form of sharding, every case, eager and compiled ----

def _rows_of(rank):
    step = -(-V // WORLD)
    return slice(rank * step, min(V, (rank + 1) * step))


def _plain(out):
    return out.to_local() if isinstance(out, DTensor) else out


def _run_cases(rank, form, names, modes=(False, True)):
    mesh = init_device_mesh("cpu", (WORLD,))
    rows = _rows_of(rank)
    for compiled in modes:
        for name in names:
            fused, reference = CASES[name]
            x = _inputs()
            h, w, b = (x[k].clone().requires_grad_() for k in ("hidden", "weight", "bias"))
            gold, gold_out = reference(h, w, x, b)
            gold.backward()
            if form == "dtensor":    # tensor parallel: Shard(0) weight, Replicate hidden
                hl = x["hidden"].clone().requires_grad_()
                hidden = DTensor.from_local(hl, mesh, [Replicate()])
                weight = distribute_tensor(x["weight"].clone(), mesh, [Shard(0)]).requires_grad_()
                bias = distribute_tensor(x["bias"].clone(), mesh, [Shard(0)]).requires_grad_()
                x["teacher_w"] = distribute_tensor(x["teacher_weight"], mesh, [Shard(0)])
            elif form == "sequence":  # sequence parallel: hidden sharded over tokens
                hl = x["hidden"][rank * N // WORLD:(rank + 1) * N // WORLD].clone().requires_grad_()
                hidden = DTensor.from_local(hl, mesh, [Shard(0)])
                weight = distribute_tensor(x["weight"].clone(), mesh, [Shard(0)]).requires_grad_()
                bias = distribute_tensor(x["bias"].clone(), mesh, [Shard(0)]).requires_grad_()
                x["teacher_w"] = distribute_tensor(x["teacher_weight"], mesh, [Shard(0)])
            else:                    # by hand: VocabShard with a plain hidden
                hl = hidden = x["hidden"].clone().requires_grad_()
                local = x["weight"][rows].clone().requires_grad_()
                weight = VocabShard(local, rows.start, V)
                bias = x["bias"][rows].clone().requires_grad_()
                x["teacher_w"] = VocabShard(x["teacher_weight"][rows], rows.start, V)
            run = torch.compile(fused, fullgraph=True, backend="aot_eager") if compiled else fused
            loss, out = run(hidden, weight, x, bias)
            _plain(loss).backward()
            where = f"{name} ({form}, {'compiled' if compiled else 'eager'}, rank {rank})"
            torch.testing.assert_close(_plain(loss), gold, msg=lambda m: f"{where} loss: {m}")
            grad_w = weight.grad.to_local() if isinstance(weight, DTensor) else weight.weight.grad
            torch.testing.assert_close(grad_w, w.grad[rows], msg=lambda m: f"{where} grad_weight: {m}")
            want_h = h.grad if form != "sequence" else h.grad[rank * N // WORLD:(rank + 1) * N // WORLD]
            torch.testing.assert_close(hl.grad, want_h, msg=lambda m: f"{where} grad_hidden: {m}")
            if "bias" in name:
                grad_b = bias.grad.to_local() if isinstance(bias, DTensor) else bias.grad
                torch.testing.assert_close(grad_b, b.grad[rows], msg=lambda m: f"{where} grad_bias: {m}")
            for got, want in zip(out, gold_out):
                torch.testing.assert_close(_plain(got).to(want.dtype), want, msg=lambda m: f"{where} output: {m}")
            torch._dynamo.reset()


# compiled, each case costs ~8 s of tracing on 2 CPU cores: one case per kind of row function and reduction
COMPILED = {"dtensor": ["ce_options_bias", "logprobs_entropy_aux", "grpo_token", "kd_jsd"],
            "vocab_shard": ["ce_none_aux", "kd_forward_kl", "dpo"],
            "sequence": ["ce_mean"]}


@pytest.mark.parametrize("form", ["dtensor", "vocab_shard", "sequence"])
def test_vocab_parallel_losses_match_single_process(form):
    _spawn(_vocab_parallel, form)


def _vocab_parallel(rank, form):
    eager = list(CASES) if form != "sequence" else ["ce_mean", "ce_none_aux", "kd_jsd", "grpo_token"]
    _run_cases(rank, form, eager, modes=(False,))
    _run_cases(rank, form, COMPILED[form], modes=(True,))


# ---- refusals ----

def _refusals(rank):
    mesh = init_device_mesh("cpu", (WORLD,))
    x = _inputs()
    weight = distribute_tensor(x["weight"], mesh, [Shard(0)])
    with pytest.raises(ValueError, match="hidden is a plain Tensor, which is ambiguous.*Replicate.*VocabShard"
                                         ".*call_head.*unshard"):
        linear_cross_entropy(x["hidden"], weight, x["targets"])
    with pytest.raises(NotImplementedError, match="a user's function's reductions over the vocabulary are unknown"):
        fused_loss(lambda logits, t: logits.logsumexp(-1))(DTensor.from_local(x["hidden"], mesh, [Replicate()]),
                                                           weight, x["targets"])
    with pytest.raises(NotImplementedError, match=r"sharded over the vocabulary on a 1-D mesh"):
        linear_cross_entropy(DTensor.from_local(x["hidden"], mesh, [Replicate()]),
                             distribute_tensor(x["weight"], mesh, [Replicate()]), x["targets"])
    with pytest.raises(ValueError, match="teacher_weight must be split over the vocabulary as weight is"):
        linear_kd_loss(x["hidden"], VocabShard(x["weight"][_rows_of(rank)], _rows_of(rank).start, V),
                       x["teacher_hidden"], x["teacher_weight"])
    with pytest.raises(TypeError, match="hidden is a DTensor but weight is a plain Tensor"):
        linear_cross_entropy(DTensor.from_local(x["hidden"], mesh, [Replicate()]), x["weight"], x["targets"])


def test_refusals_name_the_fix():
    _spawn(_refusals)


# ---- FSDP2: the head's weight gathered by its own module call ----

class _TinyLM(nn.Module):
    def __init__(self, tied):
        super().__init__()
        self.embed = nn.Embedding(V, D)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(D, D), nn.Tanh()) for _ in range(2))
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, V, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, ids):
        h = self.embed(ids)
        for layer in self.layers:
            h = h + layer(h)
        return self.norm(h)


def _twins(build):
    """The one-process reference and the model to shard, with the same fp64 weights."""
    torch.manual_seed(0)
    reference, model = build().double(), build().double()
    model.load_state_dict(reference.state_dict())
    return reference, model


def _rank_batches(seed):
    """(WORLD, 2, 9) token ids and targets: each rank's own batch, the reference sees them all."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (WORLD, 2, 9), generator=g), torch.randint(0, V, (WORLD, 2, 9), generator=g)


def _fsdp_step(model, ids, targets, fused):
    hidden = model(ids)
    if fused:
        return call_head(model.head, linear_cross_entropy, hidden, targets, options=CHUNKS)
    return F.cross_entropy(model.head(hidden).float().flatten(0, 1), targets.flatten())


def _fsdp(rank, layout, tied, compiled):
    from torch.distributed.fsdp import fully_shard
    reference, model = _twins(lambda: _TinyLM(tied))
    ids, targets = _rank_batches(seed=1)
    targets[:, :, ::4] = -100
    # the reference: one process, the mean over ranks of each rank's loss (FSDP averages the ranks' gradients)
    sum(_fsdp_step(reference, ids[r], targets[r], fused=False) for r in range(WORLD)).div(WORLD).backward()
    mesh = init_device_mesh("cpu", (WORLD,))
    if compiled:
        for layer in model.layers:
            layer.compile(backend="aot_eager")
    if layout != "root":
        for layer in model.layers:
            fully_shard(layer, mesh=mesh)
    if layout == "head":
        fully_shard(model.head, mesh=mesh, reshard_after_forward=True)
    if layout == "tied":
        fully_shard([model.embed, model.head], mesh=mesh)
    fully_shard(model, mesh=mesh)
    for step in range(2):  # a second step: the weight resharded and gathered again
        model.zero_grad()
        _fsdp_step(model, ids[rank], targets[rank], fused=True).backward()
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(p.grad.full_tensor(), q.grad, msg=lambda m: f"{layout} tied={tied} {name}: {m}")
    if layout in ("head", "tied"):  # outside its module call the head's weight is a sharded DTensor: refused
        hidden = model(ids[rank])
        assert isinstance(model.head.weight, DTensor)
        with pytest.raises(ValueError, match="call_head"):
            linear_cross_entropy(hidden, model.head.weight, targets[rank])


LAYOUTS = [("root", False, False), ("layers", False, True), ("head", False, False), ("tied", True, False),
           ("tied", True, True)]  # (groups, tied embedding/head, layers compiled)


def _fsdp_layouts(rank):
    for layout in LAYOUTS:
        _fsdp(rank, *layout)
        torch._dynamo.reset()


def test_fsdp2_gradients_equal_one_process():
    """The head in the root group, per layer + root, a resharding head of its own, a tied embedding/head group."""
    _spawn(_fsdp_layouts)


def _fsdp_transformers(rank):
    from transformers import LlamaConfig, LlamaForCausalLM
    from torch.distributed.fsdp import fully_shard
    from lce_compile.integrations.transformers import patch
    config = LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    reference, model = _twins(lambda: LlamaForCausalLM(config))
    ids, _ = _rank_batches(seed=2)
    labels = ids.clone()
    labels[:, :, :3] = -100
    sum(reference(input_ids=ids[r], labels=labels[r]).loss for r in range(WORLD)).div(WORLD).backward()
    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model.lm_head, mesh=mesh, reshard_after_forward=True)
    fully_shard(model, mesh=mesh)
    with patch(model):
        model(input_ids=ids[rank], labels=labels[rank]).loss.backward()
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(p.grad.full_tensor(), q.grad, msg=lambda m: f"{name}: {m}")


def test_fsdp2_transformers_patch_equals_one_process():
    pytest.importorskip("transformers")
    _spawn(_fsdp_transformers)


def test_tp_benchmark_runs_and_agrees(tmp_path):
    """python -m lce_compile.bench.tp on a tiny shape: every method runs and is as accurate as loss_parallel()."""
    from lce_compile.bench import tp
    report = tp.main(["--shape", "64,16,96", "--repeat", "1", "--warmup", "0", "--json", str(tmp_path / "tp.json")])
    rows = report["results"]
    assert set(rows) == set(tp.METHODS) and not any("error" in row for row in rows.values()), rows
    for key in ("err_loss", "err_grad_h", "err_grad_w"):
        assert rows["fused"][key] <= 2 * rows["loss_parallel"][key] + 1e-6, (key, rows)


def test_fsdp_step_benchmark_runs_and_matches_one_process():
    """python -m lce_compile.bench.fsdp_step on a tiny Llama: patched FSDP2 gradients equal one process's."""
    pytest.importorskip("transformers")
    from lce_compile.bench import fsdp_step
    rows = fsdp_step.main(["--tokens", "16", "--batch", "2", "--repeat", "1", "--warmup", "0"])["results"]
    assert rows["patched"]["grad_rel_err_max"] < 1e-5, rows
