"""The one fused engine: the chunk loop, reductions and fp32 accumulators.

A loss is a *row function* ``fn(logits (C, V), *row_inputs (C, ...), **kwargs)`` that returns one value per
row (or a scalar it declares as a sum or a mean of rows). The engine computes ``hidden @ weight.T (+ bias)``
one chunk of rows at a time, runs ``fn`` on the chunk, and, when gradients are wanted, differentiates the
chunk right away (gradient-in-forward), so no ``(N, V)`` tensor ever exists. ``forward`` and ``backward`` are
the bodies of the fused operator (``boundary.py``): plain eager code on real tensors, whoever the caller is.

A row function may also bring its own uncompiled chunk step, for chunks that run in place (policy: the CPU's):
its attribute ``eager_step(**options)`` returns, for the call's non-tensor options, ``step(logits, args,
kwargs, cotangent, want_bias) -> (value, aux, dbias)`` with ``_chunk_step``'s contract (the rows' values; with a
cotangent, their gradient written over ``logits``), or None. ``logits`` and the frozen heads' logits in ``args``
are then contiguous rows the step may overwrite; ``args``/``kwargs`` are fn's row and keyword inputs. The
cross-entropy and log-prob rows use it to run PyTorch's log-softmax kernel in place (``_rows.log_prob_step``),
distillation its divergences: one or two buffers where differentiating ``fn`` holds five or more.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple, Optional

import torch
from torch.func import grad_and_value

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

    def logits(self, rows_contiguous=False) -> torch.Tensor:
        with torch.no_grad():
            return ops.linear(self.hidden.detach(), self.weight.detach(),
                              None if self.bias is None else self.bias.detach(), rows_contiguous)


def _take(t, keep, start, end):
    """Rows ``start:end`` of the rows the call computes: of ``t`` itself, or of its rows ``keep`` (an index)."""
    return t[start:end] if keep is None else t.index_select(0, keep[start:end])


def _rows(row_inputs, keep, start, end):
    return tuple(Head(_take(r.hidden, keep, start, end), r.weight, r.bias) if isinstance(r, Head)
                 else _take(r, keep, start, end) for r in row_inputs)


def _materialize(row_inputs, rows_contiguous=False):
    """Frozen heads' chunk logits in place of the heads (one matmul each, outside the compiled step)."""
    return tuple(r.logits(rows_contiguous) if isinstance(r, Head) else r for r in row_inputs)


def _buffers(row_inputs) -> int:
    """(C, V) buffers a chunk holds: the main logits and one per frozen head."""
    return 1 + sum(isinstance(r, Head) for r in row_inputs)


def accumulation_dtype(hidden) -> torch.dtype:
    """Sums that cross chunks accumulate in fp32 (fp64 for fp64 inputs)."""
    return torch.promote_types(hidden.dtype, torch.float32)


def forward(plan: Plan, hidden, weight, bias, row_inputs, tensor_kwargs, row_weight, denom, needs, keep=None):
    """The call's outputs ``(value, *aux)`` over ``hidden (N, D)``, and for a reduced loss whose gradients are
    wanted (``needs``: hidden, weight, bias) the gradients too, computed in the same pass (else ``None``).
    ``keep``: the index of the rows to compute; the others give 0 (values, aux and gradients), at no cost.

    The body of the fused operator (``boundary``): eager PyTorch on real tensors, never traced.
    """
    sched = _schedule(plan, hidden, weight, row_inputs, keep)  # decided once
    if plan.reduction == "none" or not any(needs):
        values, aux, _ = _chunk_loop(plan, sched, hidden, weight, bias, row_inputs, tensor_kwargs,
                                     cotangent=None, row_weight=row_weight, needs=(False, False, False), keep=keep)
        return (_reduce(plan, *values, denom), *aux), None
    values, aux, grads = _chunk_loop(plan, sched, hidden, weight, bias, row_inputs, tensor_kwargs,
                                     cotangent=_reduction_scale(plan, hidden, denom), row_weight=row_weight,
                                     needs=needs, keep=keep)
    return (_reduce(plan, *values, denom), *aux), _finish_grads(grads, hidden, weight, bias)


def backward(plan: Plan, grad_value, hidden, weight, bias, row_inputs, tensor_kwargs, row_weight, denom, needs,
             keep=None):
    """The gradients ``(grad_hidden, grad_weight, grad_bias)`` (``None`` where not ``needs``), recomputing every
    chunk: ``reduction="none"`` (the upstream gradient is per row), or a second backward of a reduced loss."""
    sched = _schedule(plan, hidden, weight, row_inputs, keep)
    cotangent = grad_value.to(accumulation_dtype(hidden))
    if plan.reduction != "none":
        cotangent = cotangent * _reduction_scale(plan, hidden, denom)
    _, _, grads = _chunk_loop(plan, sched, hidden, weight, bias, row_inputs, tensor_kwargs, cotangent=cotangent,
                              row_weight=row_weight if plan.returns == "mean" else None, needs=needs, keep=keep)
    return _finish_grads(grads, hidden, weight, bias)


def _schedule(plan, hidden, weight, row_inputs, keep):
    rows = hidden.shape[0] if keep is None else keep.shape[0]
    return policy.schedule(_chunk_step, rows, hidden, weight, plan.options, _buffers(row_inputs))


def _reduction_scale(plan, hidden, denom):
    """d(loss)/d(sum of the chunks' values): 1/denominator for "mean", 1 for "sum"."""
    if plan.reduction == "mean":
        return _mean_scale(denom)
    return hidden.new_ones((), dtype=accumulation_dtype(hidden))


def _mean_scale(denom):
    # All rows ignored: the loss is 0/0 = NaN as in PyTorch, but every row's gradient is exactly 0,
    # so a zero scale keeps the gradients at 0 instead of 0 * inf = NaN.
    return torch.where(denom == 0, 0.0, 1.0 / denom)


def values_of(plan: Plan, logits, row_inputs, tensor_kwargs):
    """``plan``'s row function on ``logits`` (the fused operator's fake implementation runs it on fake tensors
    for the outputs' dtypes and shapes), its value checked."""
    kwargs = dict(plan.kwargs, **dict(zip(plan.tensor_keys, tensor_kwargs)))
    value, aux = _apply(plan.fn, kwargs, plan.row_keys, logits, row_inputs)
    _check_value(plan, value, logits.shape[0])
    return value, aux


def with_kwargs(plan: Plan, kwargs: dict) -> Plan:
    return dataclasses.replace(plan, kwargs=dict(plan.kwargs, **kwargs))


def _apply(fn, kwargs, row_keys, logits, row_inputs):
    """fn(logits, *row inputs, **kwargs), the last ``len(row_keys)`` row inputs passed by keyword."""
    args, kwargs = _split(kwargs, row_keys, row_inputs)
    out = fn(logits, *args, **kwargs)
    return (out[0], tuple(out[1])) if isinstance(out, tuple) else (out, ())


def _split(kwargs, row_keys, row_inputs):
    """(fn's positional row inputs, its keyword arguments with the last ``len(row_keys)`` row inputs)."""
    split = len(row_inputs) - len(row_keys)
    return row_inputs[:split], dict(kwargs, **dict(zip(row_keys, row_inputs[split:])))


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


def _own_step(plan, sched):
    """plan.fn's own chunk step for this call's options, where the policy runs chunks in place; else None."""
    make = getattr(plan.fn, "eager_step", None)
    if make is None or not policy.in_place_chunks(sched) or plan.returns != "rows":
        return None
    return make(**plan.kwargs)


def _chunk_loop(plan, sched, hidden, weight, bias, row_inputs, tensor_kwargs, *, cotangent, row_weight, needs,
                keep=None):
    """The loop over chunks (of the rows ``keep``, when given: the others give 0 and exact zero gradients).

    cotangent: None (values only), a 0-d scale for every row, or per-row ``(N,)`` upstream gradients.
    Returns ((values, dtype of fn's values), aux, (grad_hidden, grad_weight, grad_bias)): grad_bias summed in fp32,
    grad_weight in ``sched.grad_weight_dtype`` (fp32 on the CPU and MPS, the weight's dtype on CUDA); values
    are per-row for reduction "none", else the fp32 sum over chunks of each chunk's (weighted) value.
    """
    vocab = weight.shape[0]
    want_h, want_w, want_b = needs if cotangent is not None else (False, False, False)
    kwargs = dict(plan.kwargs, **dict(zip(plan.tensor_keys, tensor_kwargs)))
    acc = accumulation_dtype(hidden)  # fp32, or fp64 for fp64 inputs
    grad_h = None
    if want_h:
        grad_h = torch.empty_like(hidden) if keep is None else torch.zeros_like(hidden)
    grad_w = torch.empty(weight.shape, dtype=sched.grad_weight_dtype, device=weight.device) if want_w else None
    grad_b = torch.zeros(vocab, dtype=acc, device=weight.device) if want_b else None
    total = hidden.new_zeros((), dtype=acc)
    pieces, aux_pieces, out_dtype = [], [[] for _ in plan.aux_keys], None
    own = _own_step(plan, sched)
    with sched.context():
        for k, (start, end) in enumerate(sched.bounds):
            hidden_c = _take(hidden, keep, start, end)
            rows_c = _materialize(_rows(row_inputs, keep, start, end), rows_contiguous=own is not None)
            cot = cotangent if cotangent is None or cotangent.dim() == 0 else _take(cotangent, keep, start, end)
            chunk_weight = None
            if plan.returns == "mean":  # fn returns a mean over the chunk: weight it by the chunk's share
                chunk_weight = _take(row_weight, keep, start, end).sum()
                cot = None if cot is None else cot * chunk_weight
            # one (C, V) buffer: the logits, then (written by the step, in place) their gradient
            logits = ops.linear(hidden_c, weight, bias, rows_contiguous=own is not None)
            args = None
            if own is not None:
                args, fn_kwargs = _split(kwargs, plan.row_keys, rows_c)
                value, aux, dbias = own(logits, args, fn_kwargs, cot, want_b)
            else:
                step = sched.step_for(end - start, _chunk_step)
                if step is not _chunk_step:
                    policy.mark_rows_dynamic(logits, *rows_c, cot)
                value, aux, dbias = step(plan.fn, kwargs, plan.row_keys, logits, rows_c, cot, want_b)
            _check_value(plan, value, end - start)
            out_dtype = value.dtype
            total = _accumulate(plan, total, pieces, value, chunk_weight)
            for bucket, a in zip(aux_pieces, aux):
                bucket.append(a)
            if want_w:
                ops.add_product_(grad_w, logits.t(), hidden_c, first=k == 0)
            if want_h and keep is None:
                torch.mm(logits, weight, out=grad_h[start:end])
            elif want_h:  # hidden_c is a gathered copy, read for the last time above: the rows' gradient reuses it
                grad_h.index_copy_(0, keep[start:end], torch.mm(logits, weight, out=hidden_c))
            if want_b:
                grad_b += dbias
            del logits, rows_c, args  # before the next chunk's buffers are allocated (a teacher's logits too)
    values = _every_row(torch.cat(pieces), keep, hidden) if plan.reduction == "none" else total
    aux = tuple(_every_row(torch.cat(bucket), keep, hidden) for bucket in aux_pieces)
    return (values, out_dtype), aux, (grad_h, grad_w, grad_b)


def _every_row(computed, keep, hidden):
    """Per-row results of the computed rows in every row's place: 0 for the rows ``keep`` leaves out."""
    if keep is None:
        return computed
    return computed.new_zeros((hidden.shape[0], *computed.shape[1:])).index_copy_(0, keep, computed)


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
