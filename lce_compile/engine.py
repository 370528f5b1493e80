"""The one fused engine: the chunk loop, its autograd.Function, reductions and fp32 accumulators.

A loss is a *row function* ``fn(logits (C, V), *row_inputs (C, ...), **kwargs)`` that returns one value per
row (or a scalar it declares as a sum or a mean of rows). The engine computes ``hidden @ weight.T (+ bias)``
one chunk of rows at a time, runs ``fn`` on the chunk, and, when gradients are wanted, differentiates the
chunk right away (gradient-in-forward), so no ``(N, V)`` tensor ever exists.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple, Optional

import torch
from torch.func import grad_and_value
from torch.utils.checkpoint import checkpoint

from . import checks, ops, policy
from .policy import FusedOptions


@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
    """Everything static about one fused call."""

    name: str                 # for messages, e.g. "linear_cross_entropy"
    fn: Callable              # the row function
    returns: str              # what fn returns per chunk: "rows" | "sum" | "mean"
    reduction: str            # what the call returns: "none" (rows) | "sum" | "mean"
    kwargs: dict              # fn's non-tensor keyword arguments
    options: FusedOptions     # no default: under torch.compile a default instance has no source to guard on
    tensor_keys: tuple = ()   # fn's tensor keyword arguments, passed to apply() positionally
    row_keys: tuple = ()      # keyword names of the last row inputs (split by rows like the others)
    aux_keys: tuple = ()      # names of per-row outputs fn returns beside its values
    row_shape: tuple = ()     # shape of fn's value per row ("rows"): () or e.g. (2,) for two values per row


class Head(NamedTuple):
    """A frozen second output layer as a row input: the row function receives its ``(C, V)`` logits,
    ``hidden[rows] @ weight.T (+ bias)``, computed chunk by chunk like the main logits and never differentiated
    (a distillation teacher). Its hidden size may differ from the main head's."""

    hidden: torch.Tensor            # (..., D') with the main hidden's leading shape
    weight: torch.Tensor            # (V', D')
    bias: Optional[torch.Tensor] = None

    def rows(self, start, end) -> "Head":
        return Head(self.hidden[start:end], self.weight, self.bias)

    def logits(self) -> torch.Tensor:
        with torch.no_grad():
            return ops.linear(self.hidden.detach(), self.weight.detach(),
                                 None if self.bias is None else self.bias.detach())


def _rows(row_inputs, start, end):
    return tuple(r.rows(start, end) if isinstance(r, Head) else r[start:end] for r in row_inputs)


def _materialize(row_inputs):
    """Frozen heads' chunk logits in place of the heads (one matmul each, outside the compiled step)."""
    return tuple(r.logits() if isinstance(r, Head) else r for r in row_inputs)


def _buffers(row_inputs) -> int:
    """(C, V) buffers a chunk holds: the main logits and one per frozen head."""
    return 1 + sum(isinstance(r, Head) for r in row_inputs)


def accumulation_dtype(hidden) -> torch.dtype:
    """Sums that cross chunks accumulate in fp32 (fp64 for fp64 inputs)."""
    return torch.promote_types(hidden.dtype, torch.float32)


def fused_call(plan: Plan, hidden, weight, bias, row_inputs, tensor_kwargs=(), row_weight=None):
    """Run ``plan`` over ``hidden (..., D)``; returns the loss, or ``(loss, aux tuple)`` if plan has aux.

    ``row_weight (...)``: per-row weights whose sum is the denominator of a ``"mean"`` (default: one per row).
    """
    cast = policy.autocast_dtype(hidden.device)
    if cast is not None:
        # The unfused code under autocast: the matmuls in the autocast dtype, the loss in fp32, gradients cast
        # back to each input's dtype. The same here, with the casts done once and differentiably, and the chunks
        # (including a backward that recomputes them) run outside autocast on the cast tensors.
        hidden, weight, bias = (policy.autocast_input(t, cast) for t in (hidden, weight, bias))
        row_inputs = tuple(Head(*(policy.autocast_input(t, cast) for t in r)) if isinstance(r, Head) else r
                           for r in row_inputs)
        with torch.autocast(hidden.device.type, enabled=False):
            return fused_call(plan, hidden, weight, bias, row_inputs, tensor_kwargs, row_weight)
    if policy.under_function_transform():
        raise checks.function_transform_error(plan.name)
    lead, dim = hidden.shape[:-1], hidden.shape[-1]
    hidden = hidden.reshape(-1, dim)
    n = hidden.shape[0]
    row_inputs = tuple(Head(r.hidden.reshape(n, r.hidden.shape[-1]), r.weight, r.bias) if isinstance(r, Head)
                       else r.reshape(n, *r.shape[len(lead):]) for r in row_inputs)
    acc = accumulation_dtype(hidden)
    if plan.returns == "mean" and row_weight is None:
        row_weight = hidden.new_ones(n, dtype=acc)
    if row_weight is not None:
        row_weight = row_weight.reshape(n).to(acc)
    denom = None
    if plan.reduction == "mean":
        denom = row_weight.sum() if row_weight is not None else hidden.new_tensor(float(n), dtype=acc)
    needs = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
    sched = policy.schedule(_chunk_step, hidden, weight, plan.options, _buffers(row_inputs))  # decided once
    if torch.compiler.is_compiling():
        # Inside a user's torch.compile: plain differentiable chunks, each checkpointed, so that AOTAutograd
        # derives the backward (recomputing each chunk's logits) and Inductor fuses it (docs/design.md says why
        # not the autograd.Function, and what this path costs).
        out = _traced_forward(plan, sched, hidden, weight, bias, row_inputs, tensor_kwargs, row_weight, denom)
    elif torch.is_grad_enabled() and any(needs):
        out = _FusedLinearLoss.apply(plan, sched, needs, hidden, weight, bias, row_weight, denom,
                                     *row_inputs, *tensor_kwargs)
    else:
        with torch.no_grad():
            out = _forward(plan, sched, hidden, weight, bias, row_inputs, tensor_kwargs, row_weight, denom)
    value, aux = out[0], out[1:]
    if plan.reduction == "none":
        value = value.reshape(*lead, *plan.row_shape)
    aux = tuple(a.reshape(*lead, *a.shape[1:]) for a in aux)
    return (value, aux) if plan.aux_keys else value


class _FusedLinearLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plan, sched, needs, hidden, weight, bias, row_weight, denom, *tensors):
        n_rows = len(tensors) - len(plan.tensor_keys)
        row_inputs, tensor_kwargs = tensors[:n_rows], tensors[n_rows:]
        ctx.plan, ctx.sched, ctx.needs, ctx.n_rows = plan, sched, needs, n_rows
        # Saved for a backward that recomputes the chunks: every backward for "none" (the upstream gradient is
        # per row and unknown until then), the second and later ones for "mean"/"sum" (retain_graph, gradcheck).
        # The inputs are alive for the caller's backward anyway; under activation checkpointing they are
        # recomputed only if such a backward reads them.
        ctx.heads = {i: t for i, t in enumerate(tensors) if isinstance(t, Head)}  # not tensors: kept as is
        ctx.save_for_backward(hidden, weight, bias, row_weight, denom,
                              *(None if i in ctx.heads else t for i, t in enumerate(tensors)))
        ctx.grads = None
        if plan.reduction == "none":
            out = _forward(plan, sched, hidden, weight, bias, row_inputs, tensor_kwargs, row_weight, denom)
        else:
            values, aux, grads = _chunk_loop(plan, sched, hidden, weight, bias, row_inputs, tensor_kwargs,
                                             cotangent=_reduction_scale(plan, hidden, denom),
                                             row_weight=row_weight, needs=needs)
            out = (_reduce(plan, *values, denom), *aux)
            # handed over once, scaled in place: no full-size copy in backward (never traced: see fused_call)
            ctx.grads = _finish_grads(grads, hidden, weight, bias)
        ctx.mark_non_differentiable(*out[1:])
        return out

    @staticmethod
    def backward(ctx, grad_value, *_):
        plan, needs = ctx.plan, ctx.needs
        if torch.is_grad_enabled():  # create_graph=True: these gradients are not differentiable
            raise checks.double_backward_error(plan.name)
        if ctx.grads is not None:
            grads, ctx.grads = ctx.grads, None
            ops.scale_(grads, grad_value)
        else:
            hidden, weight, bias, row_weight, denom, *tensors = ctx.saved_tensors
            tensors = [ctx.heads.get(i, t) for i, t in enumerate(tensors)]
            row_inputs, tensor_kwargs = tensors[: ctx.n_rows], tensors[ctx.n_rows:]
            cotangent = grad_value.to(accumulation_dtype(hidden))
            if plan.reduction != "none":
                cotangent = cotangent * _reduction_scale(plan, hidden, denom)
            _, _, grads = _chunk_loop(plan, ctx.sched, hidden, weight, bias, row_inputs, tensor_kwargs,
                                      cotangent=cotangent,
                                      row_weight=row_weight if plan.returns == "mean" else None, needs=needs)
            grads = _finish_grads(grads, hidden, weight, bias)
        return (None, None, None, *grads, None, None) + (None,) * (len(ctx.needs_input_grad) - 8)


def _reduction_scale(plan, hidden, denom):
    """d(loss)/d(sum of the chunks' values): 1/denominator for "mean", 1 for "sum"."""
    if plan.reduction == "mean":
        return _mean_scale(denom)
    return hidden.new_ones((), dtype=accumulation_dtype(hidden))


def _mean_scale(denom):
    # All rows ignored: the loss is 0/0 = NaN as in PyTorch, but every row's gradient is exactly 0,
    # so a zero scale keeps the gradients at 0 instead of 0 * inf = NaN.
    return torch.where(denom == 0, 0.0, 1.0 / denom)


def _forward(plan, sched, hidden, weight, bias, row_inputs, tensor_kwargs, row_weight, denom):
    values, aux, _ = _chunk_loop(plan, sched, hidden, weight, bias, row_inputs, tensor_kwargs,
                                 cotangent=None, row_weight=row_weight, needs=(False, False, False))
    return (_reduce(plan, *values, denom), *aux)


def _traced_forward(plan, sched, hidden, weight, bias, row_inputs, tensor_kwargs, row_weight, denom):
    """The values of ``_chunk_loop``, differentiable, for tracing by torch.compile."""
    kwargs = dict(plan.kwargs, **dict(zip(plan.tensor_keys, tensor_kwargs)))
    total, pieces, aux_pieces = hidden.new_zeros((), dtype=accumulation_dtype(hidden)), [], []
    for start, end in sched.bounds:
        rows_c = _rows(row_inputs, start, end)  # frozen heads' logits are computed (and recomputed) inside
        value, aux = checkpoint(_chunk_values, plan.fn, kwargs, plan.row_keys, hidden[start:end], weight, bias,
                                rows_c, use_reentrant=False)
        _check_value(plan, value, end - start)
        aux_pieces.append(aux)
        chunk_weight = row_weight[start:end].sum() if plan.returns == "mean" else None
        total = _accumulate(plan, total, pieces, value, chunk_weight)
    values = torch.cat(pieces) if plan.reduction == "none" else total
    aux = tuple(torch.cat(bucket).detach() for bucket in zip(*aux_pieces))
    return (_reduce(plan, values, value.dtype, denom), *aux)


def _chunk_values(fn, kwargs, row_keys, hidden, weight, bias, row_inputs):
    return _apply(fn, kwargs, row_keys, ops.linear(hidden, weight, bias), _materialize(row_inputs))


def _apply(fn, kwargs, row_keys, logits, row_inputs):
    """fn(logits, *row inputs, **kwargs), the last ``len(row_keys)`` row inputs passed by keyword."""
    split = len(row_inputs) - len(row_keys)
    out = fn(logits, *row_inputs[:split], **dict(kwargs, **dict(zip(row_keys, row_inputs[split:]))))
    return (out[0], tuple(out[1])) if isinstance(out, tuple) else (out, ())


def _accumulate(plan, total, pieces, value, chunk_weight):
    """Add one chunk's values: per row to ``pieces`` ("none"), else into the fp32 ``total``, returned."""
    if plan.reduction == "none":
        pieces.append(value)
        return total
    if chunk_weight is not None:  # an all-ignored chunk's mean is 0/0: it weighs nothing
        return total + torch.where(chunk_weight > 0, value.to(total.dtype) * chunk_weight, 0.0)
    return total + value.to(total.dtype).sum()


def _reduce(plan, values, out_dtype, denom):
    """values: per-row (N,) for "none", else the fp32 sum of the chunks' weighted values; -> fn's dtype."""
    if plan.reduction == "mean":
        values = values / denom
    return values.to(out_dtype)


def _chunk_loop(plan, sched, hidden, weight, bias, row_inputs, tensor_kwargs, *, cotangent, row_weight, needs):
    """The eager loop over chunks (inside a user's torch.compile, ``_traced_forward`` loops instead).

    cotangent: None (values only), a 0-d scale for every row, or per-row ``(N,)`` upstream gradients.
    Returns ((values, dtype of fn's values), aux, (grad_hidden, grad_weight fp32, grad_bias fp32)); values
    are per-row for reduction "none", else the fp32 sum over chunks of each chunk's (weighted) value.
    """
    vocab = weight.shape[0]
    want_h, want_w, want_b = needs if cotangent is not None else (False, False, False)
    kwargs = dict(plan.kwargs, **dict(zip(plan.tensor_keys, tensor_kwargs)))
    acc = accumulation_dtype(hidden)  # fp32, or fp64 for fp64 inputs
    grad_h = torch.empty_like(hidden) if want_h else None
    grad_w = torch.empty(weight.shape, dtype=sched.grad_weight_dtype, device=weight.device) if want_w else None
    grad_b = torch.zeros(vocab, dtype=acc, device=weight.device) if want_b else None
    total = hidden.new_zeros((), dtype=acc)
    pieces, aux_pieces, out_dtype = [], [[] for _ in plan.aux_keys], None
    with sched.context():
        for k, (start, end) in enumerate(sched.bounds):
            hidden_c, rows_c = hidden[start:end], _materialize(_rows(row_inputs, start, end))
            cot = cotangent if cotangent is None or cotangent.dim() == 0 else cotangent[start:end]
            chunk_weight = None
            if plan.returns == "mean":  # fn returns a mean over the chunk: weight it by the chunk's share
                chunk_weight = row_weight[start:end].sum()
                cot = None if cot is None else cot * chunk_weight
            # one (C, V) buffer: the logits, then (written by the step, in place) their gradient
            logits = ops.linear(hidden_c, weight, bias)
            step = sched.step_for(end - start, _chunk_step)
            if step is not _chunk_step:
                policy.mark_rows_dynamic(logits, *rows_c, cot)
            value, aux, dbias = step(plan.fn, kwargs, plan.row_keys, logits, rows_c, cot, want_b)
            _check_value(plan, value, end - start)
            out_dtype = value.dtype
            total = _accumulate(plan, total, pieces, value, chunk_weight)
            for bucket, a in zip(aux_pieces, aux):
                bucket.append(a)
            if want_h:
                torch.mm(logits, weight, out=grad_h[start:end])
            if want_w:
                ops.add_product_(grad_w, logits.t(), hidden_c, first=k == 0)
            if want_b:
                grad_b += dbias
            del logits, rows_c  # before the next chunk's buffers are allocated (a teacher's logits too)
    values = torch.cat(pieces) if plan.reduction == "none" else total
    aux = tuple(torch.cat(bucket) for bucket in aux_pieces)
    return (values, out_dtype), aux, (grad_h, grad_w, grad_b)


def _chunk_step(fn, kwargs, row_keys, logits, row_inputs, cotangent, want_bias):
    """One chunk's values; with a cotangent, also overwrites ``logits`` with d(sum(values * cotangent))/d logits.

    Compiled by policy: one pass reads the logits for fn's reductions, the next writes their gradient over
    them, so the chunk needs one (C, V) buffer in the input dtype.
    """
    if cotangent is None:
        return (*_apply(fn, kwargs, row_keys, logits, row_inputs), None)

    def objective(logits):
        value, aux = _apply(fn, kwargs, row_keys, logits, row_inputs)
        # copies: the logits are overwritten below, and fn may return views of them
        return (value.to(cotangent.dtype) * cotangent).sum(), (value.clone(), tuple(a.clone() for a in aux))

    dlogits, (_, (value, aux)) = grad_and_value(objective, has_aux=True)(logits)
    if value.dim() == 0:
        # A scalar fn over an all-ignored chunk may have NaN gradients (0/0); its weight is 0, and so
        # must its gradient be.
        dlogits = torch.where(cotangent != 0, dlogits, 0)
    dbias = dlogits.sum(0, dtype=cotangent.dtype) if want_bias else None
    logits.copy_(dlogits)
    return value, aux, dbias


def _check_value(plan, value, rows):
    fn_name = getattr(plan.fn, "__name__", "fn")
    if plan.returns == "rows" and tuple(value.shape) != (rows, *plan.row_shape):
        if value.dim() == 0:
            raise checks.scalar_output_error(plan.name, fn_name)
        raise checks.rows_output_error(plan.name, fn_name, rows, tuple(value.shape))
    if plan.returns != "rows" and value.dim() != 0:
        raise checks.declared_scalar_error(plan.name, fn_name, plan.returns, tuple(value.shape))


def _finish_grads(grads, hidden, weight, bias):
    """fp32 accumulators -> the parameters' dtypes (a no-op for fp32)."""
    grad_h, grad_w, grad_b = grads
    if grad_w is not None:
        grad_w = grad_w.to(weight.dtype)
    if grad_b is not None:
        grad_b = grad_b.to(bias.dtype)
    return grad_h, grad_w, grad_b
