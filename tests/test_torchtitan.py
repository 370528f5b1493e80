"""integrations.torchtitan: the override resolves from torchtitan's command line; the fused loss and every gradient
of a 2-layer debug model match torchtitan's own chunked cross-entropy (tied and untied, ignored labels), alone and
under FSDP2 on two gloo ranks with torchtitan's apply_fsdp_to_decoder; no (tokens x vocab) tensor, no read-back to
the host; what it cannot do falls back to the stock loss once with a warning, or raises with strict=True."""
import copy
import os
import warnings

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("torchtitan")

from torchtitan.components.loss import ChunkedLossWrapper, CrossEntropyLoss, MSELoss  # noqa: E402
from torchtitan.config import apply_overrides  # noqa: E402
from torchtitan.models.llama3 import model_registry  # noqa: E402

from lce_compile.integrations import torchtitan as lce_tt  # noqa: E402
from memtrack import AllocationTracker, InsideFusedOps  # noqa: E402

TARGET = "lce_compile.integrations.torchtitan.lce_loss"
V, D = 2048, 256  # torchtitan's llama3 debug model


class _CausalSDPA(torch.nn.Module):
    """Stands in for the debug model's FlexAttention, which has no CPU backward: (B, L, N, H) in and out."""

    def forward(self, q, k, v, *, attention_masks=None, scale=None, enable_gqa=False, **kwargs):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=True, scale=scale, enable_gqa=enable_gqa)
        return out.transpose(1, 2)


def _model(tied, seed=0):
    config = model_registry("debugmodel").model
    config.layers = config.layers[:2]
    config.enable_weight_tying = tied
    for layer in config.layers:
        layer.attention.rope.max_seq_len = 512  # not 131072: a smaller RoPE cache builds faster
    torch.manual_seed(seed)
    model = config.build()
    with torch.no_grad():
        model.init_weights(buffer_device=torch.device("cpu"))
    for layer in model.layers.values():
        layer.attention.inner_attention = _CausalSDPA()
    return model


def _batch(batch, seq, seed=1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (batch, seq), generator=g)
    labels = torch.randint(0, V, (batch, seq), generator=g)
    labels[torch.rand(batch, seq, generator=g) < 0.1] = -100
    return tokens, labels


def _stock(num_chunks=4):
    return ChunkedLossWrapper.Config(num_chunks=num_chunks, loss_fn=CrossEntropyLoss.Config(global_vocab_size=V))


def _fused(**kw):
    return lce_tt.lce_loss(_stock(), **kw)


def _attach(loss_config, model):
    """What torchtitan's trainer does for a ChunkedLossWrapper."""
    loss = loss_config.build()
    loss.set_lm_head(model.lm_head)
    model._skip_lm_head = True
    return loss


def _step(model, loss, tokens, labels, global_valid_tokens):
    loss_value, metrics = loss(model(tokens), labels, global_valid_tokens)
    loss_value.backward()
    return loss_value.detach(), metrics


def _grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters()}


# --- the override -----------------------------------------------------------------------------------------------

def test_override_resolves_from_torchtitan_command_line():
    from torchtitan.config.manager import ConfigManager

    config = ConfigManager().parse_args(["--module", "llama3", "--config", "llama3_debugmodel", "--override.imports",
                                         TARGET + '={"chunk_memory": 0.25, "z_loss": 1e-4, "label_smoothing": 0.1}'])
    stock = config.loss
    assert apply_overrides(config.override, config)
    assert type(config.loss) is lce_tt.FusedCrossEntropyLoss.Config
    assert (config.loss.chunk_memory, config.loss.z_loss, config.loss.label_smoothing) == (0.25, 1e-4, 0.1)
    assert config.loss.num_chunks == stock.num_chunks and config.loss.loss_fn is stock.loss_fn
    loss = config.loss.build()
    assert isinstance(loss, ChunkedLossWrapper)  # so the trainer hands it the head and skips it in the model
    assert loss.options.chunk_memory == 0.25 and loss.global_vocab_size == V


def test_override_without_kwargs_and_bad_kwargs():
    from torchtitan.config.override import OverrideConfig

    holder = _Holder(_stock())
    apply_overrides(OverrideConfig(imports=[TARGET]), holder)
    assert type(holder.loss) is lce_tt.FusedCrossEntropyLoss.Config and holder.loss.z_loss == 0.0
    with pytest.raises(ValueError, match="chunk_memory"):
        lce_tt.lce_loss(_stock(), chunk_memory=0)
    with pytest.raises(ValueError, match="z_loss must be >= 0"):
        lce_tt.lce_loss(_stock(), z_loss=-1.0)


def _Holder(loss_config):
    """A root config with a loss node at fqn "loss", as Trainer.Config has."""
    from dataclasses import dataclass

    from torchtitan.components.loss import BaseLoss
    from torchtitan.config import Configurable

    @dataclass(kw_only=True, slots=True)
    class Root(Configurable.Config):
        loss: BaseLoss.Config

    return Root(loss=loss_config)


def test_override_keeps_other_losses_once_warned_or_strict_raises(monkeypatch):
    monkeypatch.setattr(lce_tt, "_warned", set())
    mse, plain = MSELoss.Config(), CrossEntropyLoss.Config()
    with pytest.warns(UserWarning, match="MSELoss.Config, not ChunkedLossWrapper.*kept unchanged"):
        assert lce_tt.lce_loss(mse) is mse
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert lce_tt.lce_loss(mse) is mse  # once
    with pytest.warns(UserWarning, match="CrossEntropyLoss.Config, not"):
        assert lce_tt.lce_loss(plain) is plain
    with pytest.raises(NotImplementedError, match="strict=True"):
        lce_tt.lce_loss(mse, strict=True)


# --- values and gradients against torchtitan's own loss ---------------------------------------------------------

@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_loss_and_every_gradient_match_torchtitan(tied):
    model = _model(tied)
    reference = copy.deepcopy(model)
    tokens, labels = _batch(2, 64)
    # the trainer's count runs over every micro-batch and rank: make it larger than this batch's
    global_valid_tokens = (labels != -100).sum() + 37
    want, _ = _step(reference, _attach(_stock(), reference), tokens, labels, global_valid_tokens)
    got, metrics = _step(model, _attach(_fused(strict=True), model), tokens, labels, global_valid_tokens)
    assert metrics == {} and got.dtype == torch.float32
    torch.testing.assert_close(got, want)
    want_grads, got_grads = _grads(reference), _grads(model)
    assert set(got_grads) == set(want_grads) and len(got_grads) >= 10
    for name, g in got_grads.items():
        torch.testing.assert_close(g, want_grads[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_z_loss_and_label_smoothing_match_unfused():
    g = torch.Generator().manual_seed(3)
    head = torch.nn.Linear(32, 97, bias=False)
    hidden = torch.randn(2, 24, 32, generator=g, requires_grad=True)
    labels = torch.randint(0, 97, (2, 24), generator=g)
    labels[0, :5] = -100
    count = torch.tensor(60)
    loss = lce_tt.FusedCrossEntropyLoss.Config(loss_fn=CrossEntropyLoss.Config(global_vocab_size=97), z_loss=1e-2,
                                               label_smoothing=0.1).build()
    loss.set_lm_head(head)
    got, _ = loss(hidden, labels, count)
    logits = head(hidden).float().flatten(0, 1)
    kept = labels.flatten() != -100
    want = (F.cross_entropy(logits, labels.flatten(), label_smoothing=0.1, reduction="sum")
            + 1e-2 * (logits.logsumexp(-1).square() * kept).sum()) / count
    torch.testing.assert_close(got, want)
    got_grads = torch.autograd.grad(got, (hidden, head.weight))
    for a, b in zip(got_grads, torch.autograd.grad(want, (hidden, head.weight))):
        torch.testing.assert_close(a, b)


def test_no_tokens_by_vocab_tensor():
    model = _model(tied=False)
    tokens, labels = _batch(4, 256)
    loss = _attach(_fused(), model)
    hidden = model(tokens).detach().requires_grad_()
    n = labels.numel()
    with AllocationTracker(inputs=[hidden, model.lm_head.weight]) as tracker:
        loss(hidden, labels, (labels != -100).sum())[0].backward()
    assert n * V == 4 * V * D  # the logits would be 4x the weight; nothing larger than its gradient is made
    assert tracker.largest <= V * D, f"a tensor of {tracker.largest} elements; N x V = {n * V}"


class _ReadBacks(InsideFusedOps):
    """Records every read of a tensor value by the host (.item(), .tolist(), bool(), int(), float(), .numpy())
    and every op whose output shape depends on values (nonzero, boolean-mask indexing): each syncs a device,
    and none can run inside a CUDA graph. The methods are patched too, as CPU tensors read without dispatching."""

    OPS = ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.unique", "aten.equal",
           "aten.is_nonzero")
    METHODS = ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__")

    def __init__(self, monkeypatch):
        super().__init__()
        self.seen, self.monkeypatch = [], monkeypatch

    def __enter__(self):
        for name in self.METHODS:
            self.monkeypatch.setattr(torch.Tensor, name, self._recording(name, getattr(torch.Tensor, name)))
        return super().__enter__()

    def __exit__(self, *exc):
        self.monkeypatch.undo()
        return super().__exit__(*exc)

    def _recording(self, name, method):
        def read(tensor, *args, **kwargs):
            self.seen.append(name)
            return method(tensor, *args, **kwargs)
        return read

    def dispatch(self, func, args, kwargs):
        if str(func.overloadpacket) in self.OPS:  # exactly: nonzero_static is given its size, it reads nothing
            self.seen.append(str(func))
        return func(*args, **kwargs)


def test_loss_never_reads_back_to_the_host_while_capturing(monkeypatch):
    model = _model(tied=True)
    tokens, labels = _batch(2, 32)
    loss = _attach(_fused(), model)
    hidden = model(tokens).detach().requires_grad_()
    count = (labels != -100).sum()
    with _ReadBacks(monkeypatch) as outside_capture:
        loss(hidden, labels, count)
    assert outside_capture.seen == ["tolist"], "the check must see target validation's one read-back"
    with monkeypatch.context() as capture:
        capture.setattr(torch.cuda, "is_available", lambda: True)
        capture.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
        with _ReadBacks(monkeypatch) as capturing:
            value, _ = loss(hidden, labels, count)
            value.backward()
    assert capturing.seen == [] and hidden.grad is not None


# --- fallbacks ----------------------------------------------------------------------------------------------------

class _ScaledHead(torch.nn.Linear):
    def forward(self, x):  # not nn.Linear's forward: the fused loss cannot know what it does
        return super().forward(x) * 0.5


def _fallback_case(monkeypatch, kind):
    model = _model(tied=False)
    if kind == "head class":
        head = _ScaledHead(D, V, bias=False)
        head.weight = model.lm_head.weight
        model.lm_head = head
    if kind == "tensor parallel":
        from torchtitan.distributed import spmd_types

        monkeypatch.setattr(spmd_types, "spmd_mesh_size", lambda axis: 2 if axis == "tp" else 1)
    tokens, labels = _batch(2, 16)
    inputs = {"advantages": torch.ones(2, 16)} if kind == "loss inputs" else {}
    return model, tokens, labels, inputs


@pytest.mark.parametrize("kind", ["head class", "loss inputs", "tensor parallel"])
def test_falls_back_to_stock_loss_once_with_a_warning(monkeypatch, kind):
    monkeypatch.setattr(lce_tt, "_warned", set())
    model, tokens, labels, inputs = _fallback_case(monkeypatch, kind)
    reference = copy.deepcopy(model)
    count = (labels != -100).sum()
    if kind == "loss inputs":  # torchtitan's CE takes no such input: its chunked wrapper passes them to it
        monkeypatch.setattr(CrossEntropyLoss, "__call__", _ce_ignoring_inputs)
    want, _ = _attach(_stock(), reference)(reference(tokens), labels, count, **inputs)
    loss = _attach(_fused(), model)
    with pytest.warns(UserWarning, match="using torchtitan's own chunked cross-entropy"):
        got, _ = loss(model(tokens), labels, count, **inputs)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss(model(tokens), labels, count, **inputs)  # once
    with pytest.raises(NotImplementedError, match="strict=True forbids"):
        _attach(_fused(strict=True), model)(model(tokens), labels, count, **inputs)
    with pytest.raises(NotImplementedError, match="has no z_loss or label_smoothing"):
        _attach(_fused(z_loss=1e-4), model)(model(tokens), labels, count, **inputs)


_stock_ce_call = CrossEntropyLoss.__call__


def _ce_ignoring_inputs(self, pred, labels, global_valid_tokens=None, **kwargs):
    return _stock_ce_call(self, pred, labels, global_valid_tokens)


def test_strict_refuses_what_it_cannot_do_exactly():
    head = torch.nn.Linear(D, V // 2, bias=False)  # half the vocabulary: a TP shard
    loss = _fused(strict=True).build()
    loss.set_lm_head(head)
    hidden, labels = torch.randn(1, 8, D), torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(NotImplementedError, match="holds 1024 of 2048 vocabulary rows"):
        loss(hidden, labels)
    loss.set_lm_head(torch.nn.Linear(D, V, bias=False))
    with pytest.raises(NotImplementedError, match="multi-token prediction"):
        loss([hidden, hidden], labels)
    assert lce_tt._tensor_parallel(hidden, head.weight, None) is None


# --- FSDP2 on two gloo ranks --------------------------------------------------------------------------------------

# torchtitan's three reshard policies, tied and untied, and a head wrapped alone (a custom parallelize_fn). Under
# "always" and "head alone" the head is resharded when the loss starts: there the loss's own unshard() matters
FSDP_CASES = [(tied, policy) for tied in (False, True) for policy in ("default", "always", "never")]
FSDP_CASES.append((False, "head alone"))
_GA, _BATCH, _SEQ = 2, 2, 32  # per rank and micro-batch


def _fsdp_worker(rank, world, path):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from torchtitan.distributed.fsdp import apply_fsdp_to_decoder, disable_fsdp_gradient_division

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("fsdp",))
        for tied, policy in FSDP_CASES:
            model = _model(tied)
            reference = copy.deepcopy(model)
            micro = [_batch(world * _BATCH, _SEQ, seed=10 + i) for i in range(_GA)]
            count = sum((labels != -100).sum() for _, labels in micro)  # the trainer's global count
            stock = _attach(_stock(), reference)
            for tokens, labels in micro:  # one process, every rank's rows
                _step(reference, stock, tokens, labels, count)
            if policy == "head alone":
                for module in (*model.layers.values(), model.lm_head, model):
                    fully_shard(module, mesh=mesh, reshard_after_forward=True)
                disable_fsdp_gradient_division(model)
            else:
                apply_fsdp_to_decoder(model, mesh, torch.float32, torch.float32, pp_enabled=False,
                                      reshard_after_forward_policy=policy)
            for module in model.modules():
                if isinstance(module, FSDPModule):
                    module.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM
            loss = _attach(_fused(strict=True), model)  # strict: a fallback would raise, not pass quietly
            rows = slice(rank * _BATCH, (rank + 1) * _BATCH)
            for i, (tokens, labels) in enumerate(micro):
                model.set_requires_gradient_sync(i == _GA - 1)  # deferred sync: reduce on the last micro-batch
                _step(model, loss, tokens[rows], labels[rows], count)
            want = _grads(reference)
            for name, p in model.named_parameters():
                torch.testing.assert_close(p.grad.full_tensor(), want[name], rtol=1e-4, atol=1e-6,
                                           msg=lambda m: f"tied={tied} {policy} {name}: {m}")
            with torch.no_grad():  # validation, as torchtitan's validator calls it: a sum, the head resharded after
                got, _ = loss(model(tokens[rows]), labels[rows])
                want_sum, _ = stock(reference(tokens[rows]), labels[rows])
            torch.testing.assert_close(got, want_sum)
            assert isinstance(model.lm_head.weight, DTensor), f"tied={tied} {policy}: the head stayed unsharded"
        dist.barrier()  # both ranks done before either tears the group down
    finally:
        dist.destroy_process_group()
    os._exit(0)  # as tests/test_distributed.py: skip the teardown where a gloo rank now and then aborts


def test_fsdp2_two_ranks_every_reshard_policy_with_gradient_accumulation(tmp_path):
    import torch.multiprocessing as mp

    # fork: the children inherit torch and torchtitan already imported (a spawned child re-imports both: ~15 s)
    mp.start_processes(_fsdp_worker, args=(2, str(tmp_path / "rendezvous")), nprocs=2, join=True,
                       start_method="fork")


# --- tensor parallel on two gloo ranks ----------------------------------------------------------------------------

def _tp_worker(rank, world, path):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
        head = torch.nn.Linear(D, V, bias=False)
        tokens_hidden = torch.randn(2, 16, D, generator=torch.Generator().manual_seed(3))
        _, labels = _batch(2, 16)
        count = (labels != -100).sum()
        reference, want_h = copy.deepcopy(head), tokens_hidden.clone().requires_grad_()
        stock = _stock().build()
        stock.set_lm_head(reference)
        stock(want_h, labels, count)[0].backward()
        # torchtitan's DTensor TP: the head Shard(0) over the vocabulary, the final norm's output Shard(1)
        head.weight = torch.nn.Parameter(distribute_tensor(head.weight.detach(), mesh, [Shard(0)]))
        local = tokens_hidden[:, rank * 8:(rank + 1) * 8].clone().requires_grad_()
        loss = _fused(strict=True).build()
        loss.set_lm_head(head)
        got, _ = loss(DTensor.from_local(local, mesh, [Shard(1)]), labels, count)
        got.backward()
        torch.testing.assert_close(got, stock(want_h.detach(), labels, count)[0])
        torch.testing.assert_close(local.grad, want_h.grad[:, rank * 8:(rank + 1) * 8])
        rows = slice(rank * V // world, (rank + 1) * V // world)
        torch.testing.assert_close(head.weight.grad.to_local(), reference.weight.grad[rows])
        dist.barrier()  # both ranks done before either tears the group down
    finally:
        dist.destroy_process_group()
    os._exit(0)  # as tests/test_distributed.py: skip the teardown where a gloo rank now and then aborts


def test_tensor_parallel_two_ranks_is_vocabulary_parallel(tmp_path):
    """A Shard(0) DTensor head beside Shard(1) hidden states (sequence parallel): the fused loss, not a fallback
    (strict), with the stock loss's value and gradients."""
    import torch.multiprocessing as mp

    mp.start_processes(_tp_worker, args=(2, str(tmp_path / "rendezvous")), nprocs=2, join=True,
                       start_method="fork")
