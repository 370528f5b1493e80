"""Vocabulary-parallel shards: the output layer's rows split over the ranks of a process group.

Rank r holds rows ``[start, start + rows)`` of the ``(V, D)`` weight. A loss localizes its inputs once
(``localize``): the local weight shard, the full hidden states, and a ``Vocab`` that the row functions use for
every reduction over the vocabulary. Per chunk only per-token vectors cross ranks (a max, sums); the gradient of
the local logits is then local, so the weight gradient needs no communication and the hidden states' gradient
one all-reduce (a reduce-scatter for sequence-sharded hidden states), done by autograd on the way back.

Exactness: ``Vocab.sum`` all-reduces in forward and passes the gradient through unchanged in backward. That is
the exact gradient as long as what it sums depends on this rank's logits and on detached values only, and every
rank computes the same loss from the sums; the row functions are written that way (a log-sum-exp around a
detached max, an entropy whose sum holds the logits and that detached max only).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import torch

__all__ = ["VocabShard", "call_head"]


class Vocab:
    """Reductions over the vocabulary of one chunk's logits ``(C, V)``: the whole vocabulary on this device."""

    sharded = False

    def total(self, weight) -> int:
        """The vocabulary size V, given the (local) weight."""
        return weight.shape[0]

    def size(self, z) -> int:
        """The vocabulary size V, given a chunk's (local) logits (C, V)."""
        return z.shape[-1]

    def sum(self, x):
        return x.sum(-1)

    def max(self, x):
        return x.detach().amax(-1)

    def logsumexp(self, z):
        return torch.logsumexp(z, dim=-1)

    def columns(self, z):
        """The vocabulary index of each column of ``z``."""
        return torch.arange(z.shape[-1], device=z.device)

    def argmax(self, z):
        """The first maximum's vocabulary index per row."""
        return z.argmax(dim=-1)

    def local(self, per_class):
        """This device's part of a ``(V,)`` per-class tensor."""
        return per_class


LOCAL = Vocab()


@dataclasses.dataclass(frozen=True)
class _Shard(Vocab):
    start: int       # first vocabulary row held here
    rows: int        # rows held here
    vocab_size: int  # V over all ranks
    group: Any       # the process group the vocabulary is split over

    sharded = True

    def total(self, weight) -> int:
        return self.vocab_size

    def size(self, z) -> int:
        return self.vocab_size

    def sum(self, x):
        return _SumOverRanks.apply(x.sum(-1), self.group)

    def max(self, x):
        return _all_reduce(x.detach().amax(-1), "max", self.group)

    def logsumexp(self, z):
        top = self.max(z)
        top = torch.where(torch.isfinite(top), top, 0.0)  # rows of -inf: log(0) = -inf, not NaN
        return top + torch.log(self.sum(torch.exp(z - top.unsqueeze(-1))))

    def columns(self, z):
        return torch.arange(self.start, self.start + z.shape[-1], device=z.device)

    def argmax(self, z):
        z = z.detach()
        local_max = z.amax(-1)
        first = torch.where(local_max == _all_reduce(local_max, "max", self.group), z.argmax(-1) + self.start,
                            self.vocab_size)
        return _all_reduce(first, "min", self.group)  # the lowest rank holding the maximum: the first index

    def local(self, per_class):
        return per_class[self.start: self.start + self.rows]


def _shard(start, rows, vocab_size, group) -> _Shard:
    if torch.compiler.is_compiling():  # a constant of the user's graph
        return _Shard(start, rows, vocab_size, group)
    return _cached_shard(start, rows, vocab_size, group)


@functools.cache
def _cached_shard(start, rows, vocab_size, group) -> _Shard:
    # one object per shard, so that our compiled chunk steps see the same constant on every call
    return _Shard(start, rows, vocab_size, group)


def _all_reduce(x, op, group):
    from torch.distributed import _functional_collectives as funcol
    return funcol.wait_tensor(funcol.all_reduce(x, op, group))


class _SumOverRanks(torch.autograd.Function):
    """All-reduce of per-rank partial sums; the gradient passes through (each rank computes the same loss)."""

    @staticmethod
    def forward(x, group):
        return _all_reduce(x, "sum", group)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _CopyToRanks(torch.autograd.Function):
    """The same hidden states on every rank: identity forward; backward sums the ranks' partial gradients."""

    @staticmethod
    def forward(x, group):
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.group = inputs[1]

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad.contiguous(), "sum", ctx.group), None


@dataclasses.dataclass(frozen=True)
class VocabShard:
    """This rank's rows of a vocabulary-parallel output layer, for people who shard by hand (Megatron-style).

    Pass it as the ``weight`` of any loss: ``linear_cross_entropy(hidden, VocabShard(w, start=..., vocab_size=V,
    group=tp_group), targets)``. ``hidden`` and the per-token inputs are the same full tensors on every rank;
    ``bias`` (if any) is this rank's ``(rows,)`` slice; ``class_weight`` stays ``(V,)``. The loss is the same on
    every rank; ``weight``'s gradient is this rank's rows, and ``hidden``'s is summed over the group (one
    all-reduce).

    Args:
        weight (Tensor): ``(rows, D)``, rows ``[start, start + rows)`` of the ``(V, D)`` output layer.
        start (int): the vocabulary index of ``weight``'s first row.
        vocab_size (int): V, over all ranks.
        group (ProcessGroup, optional): the ranks the vocabulary is split over. Default: the world.
    """

    weight: torch.Tensor
    start: int
    vocab_size: int
    group: Any = None

    @classmethod
    def from_dtensor(cls, weight) -> "VocabShard":
        """This rank's shard of a ``Shard(0)`` DTensor weight on a 1-D mesh (tensor parallel), for a plain
        ``hidden`` that is the same on every rank."""
        local, start, vocab_size, group = _dtensor_shard("VocabShard.from_dtensor", "weight", weight)
        return cls(local, start, vocab_size, group)

    def __post_init__(self):
        import torch.distributed as dist
        if not isinstance(self.weight, torch.Tensor) or _is_dtensor(self.weight) or self.weight.dim() != 2:
            raise TypeError(f"VocabShard: weight must be a plain (rows, D) Tensor (this rank's rows; for a DTensor "
                            f"use VocabShard.from_dtensor), got {_describe(self.weight)}.")
        rows = self.weight.shape[0]
        if not (0 <= self.start and self.start + rows <= self.vocab_size and rows > 0):
            raise ValueError(f"VocabShard: rows [start, start + rows) must lie in [0, vocab_size) and hold at least "
                             f"one row, got start={self.start}, rows={rows}, vocab_size={self.vocab_size}.")
        if self.group is None:
            if not dist.is_initialized():
                raise RuntimeError("VocabShard: group=None means the default process group, which is not "
                                   "initialized; call torch.distributed.init_process_group or pass group=.")
            object.__setattr__(self, "group", dist.group.WORLD)


class Local(NamedTuple):
    """A loss's inputs on this rank (see ``localize``)."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    others: tuple               # the other tensors, each full on this rank (None stays None)
    vocab: Vocab
    finish: Callable            # applied to the loss's outputs: DTensor in, DTensor out


def localize(name: str, hidden, weight, bias=None, *others) -> Local:
    """The vocabulary-parallel form of a loss's inputs (a no-op for plain tensors).

    ``weight`` may be a ``VocabShard`` (plain ``hidden``), or a ``Shard(0)`` DTensor on a 1-D mesh with a
    DTensor ``hidden`` on the same mesh: ``Replicate()``, or sharded over tokens (sequence parallel; gathered
    here, its gradient reduce-scattered by DTensor). ``others`` (targets, masks, a class weight, a teacher's
    hidden states) are returned full: DTensors replicated, plain tensors as they are.
    """
    others = tuple(_full(t) for t in others)
    if isinstance(weight, VocabShard):
        if _is_dtensor(hidden):
            raise TypeError(f"{name}: hidden must be a plain Tensor beside a VocabShard weight, got a DTensor; "
                            f"pass the DTensor weight itself instead.")
        _check_plain_bias(name, bias)
        vocab = _shard(weight.start, weight.weight.shape[0], weight.vocab_size, weight.group)
        if hidden.requires_grad:
            hidden = _CopyToRanks.apply(hidden, weight.group)
        return Local(hidden, weight.weight, bias, others, vocab, _same)
    if not _is_dtensor(weight):
        if _is_dtensor(hidden):
            raise TypeError(f"{name}: hidden is a DTensor but weight is a plain Tensor; pass the head's weight as a "
                            f"DTensor on hidden's mesh (tensor parallel), or both as plain tensors.")
        return Local(hidden, weight, bias, others, LOCAL, _same)
    local, start, vocab_size, group = _dtensor_shard(name, "weight", weight)
    if not _is_dtensor(hidden):
        raise ValueError(
            f"{name}: weight is a DTensor sharded over the vocabulary ({_placements(weight)}) but hidden is a plain "
            f"Tensor, which is ambiguous. Tensor parallel (the same tokens on every rank): pass hidden as a DTensor "
            f"on weight's mesh (DTensor.from_local(hidden, weight.device_mesh, [Replicate()])) or pass "
            f"weight=VocabShard.from_dtensor(weight). An FSDP2-sharded head: compute the loss inside the head's "
            f"module call (lce_compile.parallel.call_head(head, loss, hidden, ...)) or call head.unshard() first; "
            f"not weight.full_tensor(), whose gradients are wrong.")
    if hidden.device_mesh != weight.device_mesh:
        raise ValueError(f"{name}: hidden and weight must be DTensors on one mesh, got {hidden.device_mesh} and "
                         f"{weight.device_mesh}.")
    if bias is not None:
        if not _is_dtensor(bias) or bias.device_mesh != weight.device_mesh:
            raise TypeError(f"{name}: bias must be a DTensor sharded like weight (Shard(0) on its mesh), got "
                            f"{_describe(bias)}.")
        bias = _dtensor_shard(name, "bias", bias)[0]
    from torch.distributed.tensor import DTensor, Partial, Replicate
    mesh = weight.device_mesh
    # DTensor sums the ranks' partial gradients of hidden (an all-reduce; a reduce-scatter if token-sharded)
    hidden = hidden.redistribute(mesh, [Replicate()]).to_local(grad_placements=[Partial()])
    vocab = _shard(start, local.shape[0], vocab_size, group)

    def finish(out):
        return _map_tensors(lambda t: DTensor.from_local(t, mesh, [Replicate()], run_check=False), out)

    return Local(hidden, local, bias, others, vocab, finish)


def localize_like(name: str, vocab: Vocab, weight, bias=None, prefix: str = ""):
    """A second head over the same vocabulary (a distillation teacher): its (weight, bias) on this rank, which
    must be sharded as the first head's ``vocab``."""
    if isinstance(weight, VocabShard):
        shard = (weight.start, weight.weight.shape[0], weight.vocab_size)
        weight = weight.weight
    elif _is_dtensor(weight):
        weight, start, vocab_size, _ = _dtensor_shard(name, f"{prefix}weight", weight)
        shard = (start, weight.shape[0], vocab_size)
        bias = None if bias is None else _dtensor_shard(name, f"{prefix}bias", bias)[0]
    else:
        shard = None
    expected = (vocab.start, vocab.rows, vocab.vocab_size) if vocab.sharded else None
    if shard != expected:
        raise ValueError(f"{name}: {prefix}weight must be split over the vocabulary as weight is "
                         f"(rows [start, start + rows) of V: {expected or 'not split'}), got {shard or 'not split'}.")
    return weight, bias


def call_head(head: torch.nn.Module, loss: Callable, hidden, *args, **kwargs):
    """``loss(hidden, head.weight, *args, **kwargs)`` computed inside ``head``'s own module call.

    For an FSDP2-sharded output layer (``fully_shard`` on the head, on a group holding it, or on the root):
    its pre-forward hook gathers the weight, its hooks on the output re-gather it for a backward that needs it,
    and the gradient is reduce-scattered as for any forward. A bias is passed as ``bias=head.bias`` when the
    head has one. Returns what ``loss`` returns. Never call ``weight.full_tensor()`` instead: each rank would
    keep its own unreduced gradient.
    """
    own = vars(head).get("forward")  # an instance forward of its own, restored after the call

    def forward(hidden, *args, **kwargs):
        bias = getattr(head, "bias", None)
        if bias is not None:
            kwargs = dict(kwargs, bias=bias)
        return loss(hidden, head.weight, *args, **kwargs)

    head.forward = forward  # for this call only: FSDP's hooks run around whatever forward the module has
    try:
        return head(hidden, *args, **kwargs)
    finally:
        if own is not None:
            head.forward = own
        else:
            del head.forward


def check_generic(name: str, weight) -> None:
    """A user's row function cannot run on a vocabulary shard: its reductions over the vocabulary are unknown."""
    if isinstance(weight, VocabShard) or _is_dtensor(weight):
        raise NotImplementedError(
            f"{name}: weight is split over the vocabulary (a VocabShard or a DTensor), and a user's function's "
            f"reductions over the vocabulary are unknown. Use a ready-made loss (linear_cross_entropy, "
            f"linear_token_logprobs, ...) or fused_loss(F.cross_entropy) / fused_loss(F.nll_loss).")


def is_split(weight) -> bool:
    return isinstance(weight, VocabShard) or _is_dtensor(weight)


def _dtensor_shard(name, arg, tensor):
    """(local rows, start, V, process group) of a Shard(0) DTensor on a 1-D mesh."""
    from torch.distributed.tensor import Shard
    mesh = tensor.device_mesh
    if mesh.ndim != 1 or tuple(tensor.placements) != (Shard(0),):
        raise NotImplementedError(
            f"{name}: {arg} must be a DTensor sharded over the vocabulary on a 1-D mesh ((Shard(0),)), got "
            f"{_placements(tensor)} on a {mesh.ndim}-D mesh. Under FSDP2 + tensor parallel, compute the loss inside "
            f"the head's module call (lce_compile.parallel.call_head) so that FSDP gathers its shard first.")
    local = tensor.to_local()
    size, world, rank = tensor.shape[0], mesh.size(), mesh.get_local_rank()
    step = -(-size // world)  # torch.chunk's split: ceil(V / world) rows per rank, the last ones shorter
    start = min(rank * step, size)
    if local.shape[0] != min(step, size - start) or local.shape[0] == 0:
        raise NotImplementedError(f"{name}: {arg}'s shard on rank {rank} holds {local.shape[0]} rows, expected "
                                  f"{max(min(step, size - start), 0)} (an even ceil split with no empty rank).")
    return local, start, size, mesh.get_group()


def _full(t):
    """A tensor that is the same on every rank, as a plain tensor."""
    if not _is_dtensor(t):
        return t
    from torch.distributed.tensor import Replicate
    return t.redistribute(t.device_mesh, [Replicate()]).to_local()


def _check_plain_bias(name, bias):
    if bias is not None and _is_dtensor(bias):
        raise TypeError(f"{name}: bias must be this rank's plain (rows,) slice beside a VocabShard, got a DTensor.")


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed
        return False
    return isinstance(t, DTensor)


def _placements(t):
    return f"placements {tuple(t.placements)}"


def _describe(t):
    if isinstance(t, torch.Tensor):
        return f"{'a DTensor' if _is_dtensor(t) else 'a Tensor'} of shape {tuple(t.shape)}"
    return type(t).__name__


def _same(out):
    return out


def _map_tensors(fn, out):
    if isinstance(out, torch.Tensor):
        return fn(out)
    # lists, not generators: Dynamo (torch 2.11) cannot trace a generator into a constructor
    if isinstance(out, tuple) and hasattr(out, "_fields"):
        return type(out)(*[_map_tensors(fn, o) for o in out])
    if isinstance(out, (tuple, list)):
        return type(out)([_map_tensors(fn, o) for o in out])
    if isinstance(out, dict):
        return {k: _map_tensors(fn, v) for k, v in out.items()}
    return out  # None, numbers
