"""The fused operator: what a caller, eager or inside ``torch.compile``, sees of a fused call.

``call`` hands the whole chunked computation to one custom operator, ``lce_compile::fused_linear_loss``,
with a fake (shape) implementation and an autograd formula whose backward is a second operator,
``lce_compile::fused_linear_loss_backward``. A user's ``torch.compile`` records one node for each and never sees
the chunks, so Inductor cannot fuse them back into one ``(N, V)`` kernel; their bodies run the eager engine on
real tensors (``engine.forward`` / ``engine.backward``), with its own compiled chunk steps.

How the pieces cross the boundary:

* **The plan.** An operator takes tensors and numbers, so a ``Plan`` is interned once and passed as an int;
  its float options travel as a ``float[]`` (so that a float that changes, e.g. a temperature passed into a
  compiled step, is an input of the graph rather than a recompile).
* **Gradients computed in the forward pass** (reduced losses) are handed to the backward operator by a ticket:
  a one-element tensor the forward operator returns and autograd saves. The gradients wait in ``_HANDED`` under
  the ticket's address while the ticket lives; the backward operator takes them and scales them in place, or,
  when they were taken already (a second backward) or never made, recomputes the chunks.
* **The dispatch state.** An operator's body runs below autograd (its keys excluded) and, at a compiled
  graph's run time, with most functionality keys excluded and AOTAutograd's dispatch modes active; the engine
  differentiates chunks with ``torch.func``, which needs the plain eager state. The bodies restore it.
"""
from __future__ import annotations

import contextlib
import weakref

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack, _pop_mode, _push_mode

from . import checks, engine, ops, parallel, policy
from .engine import Head, Plan
from .policy import FusedOptions

# The thread's dispatch key sets as they are when nothing special runs (import time): autograd on, autocast
# off (its keys are in the exclude set while it is disabled).
_EAGER_KEYS = (torch._C._dispatch_tls_local_include_set(), torch._C._dispatch_tls_local_exclude_set())
_PYTHON_KEYS = (torch._C.DispatchKey.Python, torch._C.DispatchKey.PythonTLSSnapshot)


def call(plan: Plan, hidden, weight, bias, row_inputs, tensor_kwargs=(), row_weight=None, keep=None):
    """Run ``plan`` over ``hidden (..., D)``; returns the loss, or ``(loss, aux tuple)`` if plan has aux.

    ``row_weight (...)``: per-row weights whose sum is the denominator of a ``"mean"`` (default: one per row).
    ``keep``: the index (into the flattened rows) of the only rows to compute; the others give 0, at no cost.
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
            return call(plan, hidden, weight, bias, row_inputs, tensor_kwargs, row_weight, keep)
    if policy.under_function_transform():
        raise checks.function_transform_error(plan.name)
    lead, dim = hidden.shape[:-1], hidden.shape[-1]
    hidden = hidden.reshape(-1, dim)
    n = hidden.shape[0]
    row_inputs = tuple(Head(r.hidden.reshape(n, r.hidden.shape[-1]), r.weight, r.bias) if isinstance(r, Head)
                       else r.reshape(n, *r.shape[len(lead):]) for r in row_inputs)
    acc = engine.accumulation_dtype(hidden)
    if plan.returns == "mean" and row_weight is None:
        row_weight = hidden.new_ones(n, dtype=acc)
    if row_weight is not None:
        row_weight = row_weight.reshape(n).to(acc)
    denom = None
    if plan.reduction == "mean":
        denom = row_weight.sum() if row_weight is not None else hidden.new_full((), n, dtype=acc)
    grad_on = torch.is_grad_enabled()
    needs = [grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
             grad_on and bias is not None and bias.requires_grad]
    key, numbers = _plan_key(plan, row_inputs)
    tensors = [t for r in row_inputs for t in (r if isinstance(r, Head) else (r,)) if t is not None]
    out = _fused(_intern(key), numbers, needs, hidden, weight, bias, row_weight, denom, keep,
                 [*tensors, *tensor_kwargs])
    value, aux = out[0], out[2:]
    if plan.reduction == "none":  # tuples: an unbatched token's lead is ()
        value = value.reshape(tuple(lead) + tuple(plan.row_shape))
    aux = tuple(a.reshape(tuple(lead) + tuple(a.shape[1:])) for a in aux)
    return (value, aux) if plan.aux_keys else value


# ---- plans cross the boundary as ints ----------------------------------------------------------------------

_PLANS: list = []   # id -> (Plan without its float options, their names, row-input layout)
_IDS: dict = {}     # key -> id


def _plan_key(plan: Plan, row_inputs) -> tuple:
    """(a hashable key of ``plan`` made of constants, the float options' values)."""
    static, floats = [], []
    for name, value in plan.kwargs.items():
        if isinstance(value, float):
            floats.append((name, value))
        elif isinstance(value, parallel.Vocab):
            static.append((name, ("vocab", *_vocab_key(value))))
        else:
            static.append((name, value))
    options = plan.options
    layout = tuple("t" if not isinstance(r, Head) else "h" if r.bias is None else "hb" for r in row_inputs)
    key = (plan.name, plan.fn, plan.returns, plan.reduction, tuple(static), tuple(name for name, _ in floats),
           (options.chunk_size, options.chunk_memory, options.compile, options.validate, options.grad_weight_dtype),
           plan.tensor_keys, plan.row_keys, plan.aux_keys, plan.row_shape, layout)
    return key, [value for _, value in floats]


def _vocab_key(vocab) -> tuple:
    if not vocab.sharded:
        return ()
    return vocab.start, vocab.rows, vocab.vocab_size, vocab.group


@torch.compiler.assume_constant_result  # inside torch.compile: run once while tracing, a constant of the graph
def _intern(key) -> int:
    plan_id = _IDS.get(key)
    if plan_id is None:
        name, fn, returns, reduction, static, float_names, options, tensor_keys, row_keys, aux_keys, row_shape, \
            layout = key
        kwargs = {k: _vocab(v[1:]) if isinstance(v, tuple) and v[:1] == ("vocab",) else v for k, v in static}
        plan = Plan(name, fn, returns, reduction, kwargs, FusedOptions(*options), tensor_keys, row_keys, aux_keys,
                    row_shape)
        plan_id = _IDS[key] = len(_PLANS)
        _PLANS.append((plan, float_names, layout))
    return plan_id


def _vocab(key):
    return parallel.LOCAL if not key else parallel._shard(*key)


def _unpack(plan_id, numbers, tensors):
    """(plan with its float options, row inputs with their heads, tensor keyword arguments)."""
    plan, float_names, layout = _PLANS[plan_id]
    if float_names:
        plan = engine.with_kwargs(plan, dict(zip(float_names, numbers)))
    row_inputs, k = [], 0
    for kind in layout:
        size = {"t": 1, "h": 2, "hb": 3}[kind]
        part = tensors[k: k + size]
        row_inputs.append(part[0] if kind == "t" else Head(*part))
        k += size
    return plan, tuple(row_inputs), tuple(tensors[k:])


# ---- the operators -----------------------------------------------------------------------------------------

def _forward_body(plan: int, numbers: list[float], needs: list[bool], hidden: torch.Tensor, weight: torch.Tensor,
                  bias: torch.Tensor | None, row_weight: torch.Tensor | None, denom: torch.Tensor | None,
                  keep: torch.Tensor | None, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """[value, ticket, *aux] of one fused call over hidden (N, D); see the module docstring."""
    plan_, row_inputs, tensor_kwargs = _unpack(plan, numbers, tensors)
    with _eager_state():
        out, grads = engine.forward(plan_, hidden, weight, bias, row_inputs, tensor_kwargs, row_weight, denom,
                                    tuple(needs), keep)
    ticket = hidden.new_empty(1)
    if grads is not None:
        _hand_over(ticket, grads)
    return [out[0], ticket, *out[1:]]


_fused = torch.library.custom_op("lce_compile::fused_linear_loss", _forward_body, mutates_args=())


@_fused.register_fake
def _(plan, numbers, needs, hidden, weight, bias, row_weight, denom, keep, tensors):
    # the row function on fake logits gives the outputs' dtypes and shapes (and its shape errors, while tracing)
    plan_, row_inputs, tensor_kwargs = _unpack(plan, numbers, tensors)
    n = hidden.shape[0]
    rows = tuple(r.hidden.new_empty(n, r.weight.shape[0]) if isinstance(r, Head) else r for r in row_inputs)
    value, aux = engine.values_of(plan_, hidden.new_empty(n, weight.shape[0]), rows, tensor_kwargs)
    if plan_.reduction != "none":
        value = value.new_empty(())
    return [torch.empty_like(value), hidden.new_empty(1), *(torch.empty_like(a) for a in aux)]


def _backward_body(plan: int, numbers: list[float], needs: list[bool], grad_value: torch.Tensor,
                   ticket: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   row_weight: torch.Tensor | None, denom: torch.Tensor | None, keep: torch.Tensor | None,
                   tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The wanted ones of [grad_hidden, grad_weight, grad_bias]: handed over by the forward, or recomputed."""
    grads = _HANDED.pop(_ticket_key(ticket), None)
    with _eager_state():
        if grads is not None:
            ops.scale_(grads, grad_value)
        else:
            plan_, row_inputs, tensor_kwargs = _unpack(plan, numbers, tensors)
            grads = engine.backward(plan_, grad_value, hidden, weight, bias, row_inputs, tensor_kwargs, row_weight,
                                    denom, tuple(needs), keep)
    return [g for g in grads if g is not None]


_fused_backward = torch.library.custom_op("lce_compile::fused_linear_loss_backward", _backward_body,
                                          mutates_args=())

# What the operators run, for a dispatch mode that wants to see every op inside them (a mode sees the operator
# as one op, and runs it with itself set aside): ``with mode: BODIES[func](*args, **kwargs)``.
BODIES = {torch.ops.lce_compile.fused_linear_loss.default: _forward_body,
          torch.ops.lce_compile.fused_linear_loss_backward.default: _backward_body}


@_fused_backward.register_fake
def _(plan, numbers, needs, grad_value, ticket, hidden, weight, bias, row_weight, denom, keep, tensors):
    return [torch.empty_like(t) for t, need in zip((hidden, weight, bias), needs) if need]


def _setup_context(ctx, inputs, output):
    plan, numbers, needs, hidden, weight, bias, row_weight, denom, keep, tensors = inputs
    ctx.plan, ctx.numbers, ctx.needs = plan, numbers, needs
    ctx.n_numbers, ctx.n_tensors = len(numbers), len(tensors)
    ticket = output[1]
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(ticket, hidden, weight, bias, row_weight, denom, keep, *tensors)


def _backward(ctx, grads):
    grad_value = grads[0]
    if _is_real(grad_value) and torch.is_grad_enabled():  # create_graph=True: these gradients are not differentiable
        raise checks.double_backward_error(_PLANS[ctx.plan][0].name)
    ticket, hidden, weight, bias, row_weight, denom, keep, *tensors = ctx.saved_tensors
    wanted = iter(_fused_backward(ctx.plan, ctx.numbers, ctx.needs, grad_value, ticket, hidden, weight, bias,
                                  row_weight, denom, keep, tensors))
    grad_h, grad_w, grad_b = (next(wanted) if need else None for need in ctx.needs)
    # autograd's structure check reads a list of numbers as one leaf, unless it is empty
    return None, None if ctx.n_numbers else [], None, grad_h, grad_w, grad_b, None, None, None, [None] * ctx.n_tensors


_fused.register_autograd(_backward, setup_context=_setup_context)


# ---- gradients handed from the forward operator to the backward one -----------------------------------------

_HANDED: dict = {}  # ticket key -> (grad_hidden, grad_weight, grad_bias), while the ticket lives


def _ticket_key(ticket):
    return ticket.device, ticket.data_ptr()


def _hand_over(ticket, grads):
    key = _ticket_key(ticket)
    _HANDED[key] = grads
    # a forward whose backward never runs (the graph is dropped) must not keep its gradients
    weakref.finalize(ticket.untyped_storage(), _HANDED.pop, key, None)


def _is_real(t) -> bool:
    return type(t) is torch.Tensor and not t.is_meta


# ---- the dispatch state the bodies run in --------------------------------------------------------------------

@contextlib.contextmanager
def _eager_state():
    """Run the engine as plain eager code: the import-time dispatch keys (autograd included, autocast off), and
    without the dispatch modes of torch's own tracing and runtime machinery (a user's modes stay: they see
    every op of the chunks)."""
    modes = _get_current_dispatch_mode_stack()
    internal = [m for m in modes if type(m).__module__.startswith("torch.")]
    include, exclude = _EAGER_KEYS
    if len(internal) < len(modes):  # a user's mode: keep the keys that route ops to it
        current = torch._C._dispatch_tls_local_include_set()
        for key in _PYTHON_KEYS:
            if current.has(key):
                include = include.add(key)
    with torch._C._ForceDispatchKeyGuard(include, exclude), _without_modes(internal):
        yield


@contextlib.contextmanager
def _without_modes(modes):
    if not modes:
        yield
        return
    stack = _get_current_dispatch_mode_stack()
    popped = [_pop_mode() for _ in stack][::-1]  # the whole stack, bottom first
    try:
        for mode in popped:
            if mode not in modes:
                _push_mode(mode)
        yield
    finally:
        for mode in popped:
            if mode not in modes:
                _pop_mode()
        for mode in popped:
            _push_mode(mode)
