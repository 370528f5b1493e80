"""The front door: every fused loss reaches the engine through :func:`fused_call`, and ``fused_loss(fn)`` turns
a loss written for full logits into one.

``fused_call`` does a call's setup once for every loss: the options, the vocabulary-parallel localizing of every
input, the head, target and class-weight checks, the mean's row weights, the plan, the one fused operator
(``boundary.call``), the aux unpacking and the DTensor outputs. A ready-made loss is its docstring, its own
option checks, a row function and one ``fused_call``.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.nn import _reduction

from . import boundary, checks, parallel
from .engine import Head, Plan
from .losses._rows import ce_rows, kept_row_weight, nll_rows, widen
from .policy import DEFAULT_OPTIONS, FusedOptions

_RETURNS = ("rows", "sum", "mean")


def fused_call(name, fn, hidden, weight, bias=None, *, targets=None, target_arg="targets", ignore_index=-100,
               class_weight=None, class_weight_arg="class_weight", teacher=None, rows=(), row_keys=(), tensors=None,
               static=None, returns="rows", reduction="none", mean_weight=None, aux_keys=(), row_shape=(),
               options=None, splits=True, kept=None, extras=(), local_tensors=None, local_finish=None):
    """One fused call of the row function ``fn``, set up once for every loss.

    Row inputs, in ``fn``'s order: the teacher's head ``teacher = (hidden, weight, bias)`` (its logits per chunk),
    ``targets`` (checked in ``[0, V)`` or ``ignore_index``, as ``target_arg``; ``ignore_index=None``: none
    ignored), then ``rows`` (the last ``len(row_keys)`` passed by keyword). ``tensors``: ``fn``'s tensor keywords
    (whole, not split by rows), and those ``local_tensors(targets, class_weight)`` makes from this rank's checked
    tensors; ``static``: its other keywords. ``class_weight`` is checked (``(V,)``) and passed
    as ``class_weight=``. ``reduction="mean"`` divides by ``mean_weight (...)``, by default the kept targets'
    count (or summed class weights). ``kept`` (targets' shape): the rows whose values and aux the caller uses (by
    default the targets other than ``ignore_index``); the others may come back as 0. ``splits``: ``fn`` reduces
    over the vocabulary through its ``vocab=``, so the weight may be split across ranks (``parallel.localize``);
    a user's function may not.

    Returns the loss, or ``(loss, {aux key: per-row tensor})``, passed through ``local_finish(out, *extras)`` on
    this rank's tensors (``extras`` localized like the inputs), then made DTensors if the inputs were.
    """
    options = _options(name, options)
    if not splits and parallel.is_split(weight):
        parallel.check_generic(name, weight)
    tensors, static = dict(tensors or {}), dict(static or {})
    t_hidden, t_weight, t_bias = teacher or (None, None, None)
    hidden, weight, bias, others, vocab, finish = parallel.localize(
        name, hidden, weight, bias, targets, class_weight, mean_weight, t_hidden, kept, *rows, *tensors.values(),
        *extras)
    targets, class_weight, mean_weight, t_hidden, kept = others[:5]
    rows, others = others[5: 5 + len(rows)], others[5 + len(rows):]
    tensors, extras = dict(zip(tensors, others[: len(tensors)])), others[len(tensors):]
    checks.check_head(name, hidden, weight, bias)
    size = vocab.total(weight)
    row_inputs = ()
    if teacher is not None:
        t_weight, t_bias = parallel.localize_like(name, vocab, t_weight, t_bias, "teacher_")
        checks.check_head(name, t_hidden, t_weight, t_bias, prefix="teacher_")
        checks.check_teacher(name, hidden, weight, t_hidden, t_weight)
        row_inputs += (Head(t_hidden, t_weight, t_bias),)
    keep = None
    if targets is not None:
        count = checks.check_targets(name, targets, hidden, size, ignore_index, options.validate, arg=target_arg,
                                     kept=kept)
        targets = targets.long()
        row_inputs += (targets,)
        if kept is None and ignore_index is not None and not aux_keys:  # an ignored row's aux is a number
            kept = targets != ignore_index
        if count is not None and kept is not None and count < targets.numel():
            # rows that carry no loss cost nothing: the kept rows are gathered before the matmuls (their count
            # came back with the target check's one read-back, so this reads nothing more)
            keep = torch.nonzero_static(kept.reshape(-1).to(torch.bool), size=count).squeeze(1)
    checks.check_class_weight(name, class_weight_arg, class_weight, hidden, size)
    if class_weight is not None:
        tensors["class_weight"] = class_weight
    checks.check_reduction(name, reduction)
    if local_tensors is not None:
        tensors.update(local_tensors(targets, class_weight))
    if reduction == "mean" and mean_weight is None and targets is not None:
        mean_weight = kept_row_weight(targets, -100 if ignore_index is None else ignore_index, class_weight)
    if splits:
        static["vocab"] = vocab
    plan = Plan(name, fn, returns, reduction, static, options, tuple(tensors), tuple(row_keys), tuple(aux_keys),
                tuple(row_shape))
    out = boundary.call(plan, hidden, weight, bias, (*row_inputs, *rows), tuple(tensors.values()),
                        mean_weight if reduction == "mean" or returns == "mean" else None, keep)
    if aux_keys:
        out = out[0], dict(zip(aux_keys, out[1]))
    if local_finish is not None:
        out = local_finish(out, *extras)
    return finish(out)


def _options(name, options) -> FusedOptions:
    options = options or DEFAULT_OPTIONS
    if not isinstance(options, FusedOptions):
        raise TypeError(f"{name}: options must be FusedOptions, got {type(options).__name__}.")
    return options


def fused_loss(fn=None, /, *, returns: str = "rows", mean_over=None, upcast: bool = True,
               options: FusedOptions | None = None):
    r"""Make ``fn(logits, targets, ...)`` a fused loss ``f(hidden, weight, targets, ...)``.

    ``fused_loss(fn)(hidden, weight, *row_inputs, bias=None, options=None, **kwargs)`` equals, up to float
    rounding, in value and gradients::

        logits = (hidden.flatten(0, -2) @ weight.T + bias).float()  # (N, V), never materialized
        out = fn(logits, *(r.flatten(0, hidden.dim() - 2) for r in row_inputs), **kwargs)
        # per-row results come back in hidden's leading shape

    The logits are computed and differentiated one chunk of rows at a time; ``fn`` sees ``(C, V)`` fp32
    logits (as Hugging Face's causal-LM loss, torchtune and torchtitan upcast them before their
    cross-entropy; fp64 stays fp64; ``upcast=False`` keeps the matmul's dtype, ``.float()`` dropped above)
    and the matching ``(C, ...)`` rows of every positional tensor after ``weight``. The matmul itself runs in
    the inputs' dtype, and the upcast fuses into ``fn``'s first pass over the chunk.
    A keyword tensor with hidden's leading shape is split by rows too; every other keyword argument
    reaches every chunk unchanged (to pass a global tensor of that shape, bind it with
    ``functools.partial``). ``bias`` and ``options`` are the fused call's own.

    What ``fn`` may return (the contract):
        * ``returns="rows"`` (default): one value per row, shape ``(C,)``. The fused call returns the same
          per-row tensor the unfused call would, with any upstream gradient. A scalar raises ``ValueError``.
        * ``returns="sum"``: a scalar that is the sum over its rows of a per-row loss.
        * ``returns="mean"``: a scalar that is the weighted mean over its rows of a per-row loss, with
          weights ``mean_over(*row_inputs) -> (C,)`` (default: every row weighs 1), e.g.
          ``mean_over=lambda targets: targets != -100`` for a mean over kept tokens. The weights must be
          the ones ``fn`` averages with: a ``fn`` that averages over kept tokens declared without
          ``mean_over`` returns NaN (0/0) for a chunk with no kept token, and the fused result is NaN where
          the unfused one is a number.
        A declaration is a promise about ``fn``: chunk results are combined as sums or weighted means,
        which is exact only if ``fn`` is one. Scalar declarations compute gradients in the forward pass.

    Known functions: ``F.cross_entropy`` and ``F.nll_loss`` are understood without a declaration, with
    every keyword (``weight``, ``ignore_index``, ``reduction``, ``label_smoothing``): ``"mean"`` is the
    global mean over kept tokens weighted by the class weights, as in PyTorch. Their class ``weight`` is
    cast to the logits' dtype, so an fp32 ``weight`` works beside bf16 inputs.

    Args:
        fn: the loss, ``fn(logits (C, V), *row_inputs (C, ...), **kwargs)``. Rows must be independent.
        returns (str): ``"rows"`` | ``"sum"`` | ``"mean"``; see above.
        mean_over (callable, optional): row weights of a ``returns="mean"`` function.
        upcast (bool): hand ``fn`` fp32 logits (default); ``False`` hands it the matmul's dtype (bf16 logits
            for bf16 inputs: less memory traffic, but a bf16 loss ~100x less precise for a cross-entropy).
        options (FusedOptions, optional): engine knobs; a call's ``options=`` overrides them.
    Returns:
        a callable ``(hidden (..., D), weight (V, D), *row_inputs, bias=None, options=None, **kwargs)``.
    Memory: the gradients plus one ``(C, V)`` chunk; never ``(N, V)``, on any device.

    .. note::
        Under ``torch.autocast``, ``fn`` runs outside it, on logits from matmuls in the autocast dtype.
        Only ``hidden``, ``weight`` and ``bias`` get gradients; another input that requires grad raises
        ``NotImplementedError``. Row inputs must have hidden's leading shape (``ValueError`` otherwise).
    """
    if fn is None:
        return functools.partial(fused_loss, returns=returns, mean_over=mean_over, upcast=upcast, options=options)
    return FusedLoss(fn, returns=returns, mean_over=mean_over, upcast=upcast, options=options)


class FusedLoss:
    """The callable ``fused_loss(fn)`` returns; see :func:`fused_loss`."""

    def __init__(self, fn, *, returns="rows", mean_over=None, upcast=True, options=None):
        if not callable(fn):
            raise TypeError(f"fused_loss: fn must be callable, got {type(fn).__name__}.")
        if returns not in _RETURNS:
            raise ValueError(f"fused_loss: returns must be one of 'rows', 'sum', 'mean', got {returns!r}.")
        if mean_over is not None and returns != "mean":
            raise ValueError(f"fused_loss: mean_over applies to returns='mean' only, got returns={returns!r}.")
        if options is not None and not isinstance(options, FusedOptions):
            raise TypeError(f"fused_loss: options must be FusedOptions, got {type(options).__name__}.")
        if not isinstance(upcast, bool):
            raise TypeError(f"fused_loss: upcast must be a bool, got {upcast!r}.")
        self.fn, self.returns, self.mean_over, self.upcast, self.options = fn, returns, mean_over, upcast, options
        # the function the engine runs on each chunk: one object per (fn, upcast), so compiled steps are reused
        self.row_fn = _upcasting(fn) if upcast else fn
        self.__name__ = getattr(fn, "__name__", type(fn).__name__)
        self.__doc__, self.__wrapped__ = fn.__doc__, fn  # not functools.update_wrapper: dynamo can't trace it
        self.name = f"fused_loss({self.__name__})"

    def __repr__(self):
        return f"{self.name[:-1]}, returns={self.returns!r})"

    def __call__(self, hidden, weight, /, *row_inputs, bias=None, options=None, **kwargs):
        options = _options(self.name, options or self.options)
        form = _KNOWN.get(self.fn) if self.returns == "rows" else None
        if form is not None:
            return form(self, hidden, weight, bias, row_inputs, kwargs, options)
        return self._generic(hidden, weight, bias, row_inputs, kwargs, options)

    def _generic(self, hidden, weight, bias, row_inputs, kwargs, options):
        checks.check_keywords(self.name, self.fn, len(row_inputs), kwargs)
        names = _row_names(self.fn, len(row_inputs))
        for arg, tensor in zip(names, row_inputs):
            checks.check_rows(self.name, arg, tensor, hidden)
            checks.check_no_grad(self.name, arg, tensor)
        static = {k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)}
        tensors = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
        for key, tensor in tensors.items():
            checks.check_device(self.name, key, tensor, hidden)
            checks.check_no_grad(self.name, key, tensor)
        # a keyword tensor with hidden's leading shape is per-row, like the positional ones
        lead = hidden.shape[:-1]
        row_kw = {k: v for k, v in tensors.items() if v.shape[: len(lead)] == lead}
        tensors = {k: v for k, v in tensors.items() if k not in row_kw}
        mean_weight = None
        if self.mean_over is not None:
            mean_weight = self.mean_over(*row_inputs)
            checks.check_rows(self.name, "mean_over(...)", mean_weight, hidden)
        reduction = {"rows": "none", "sum": "sum", "mean": "mean"}[self.returns]
        return fused_call(self.name, self.row_fn, hidden, weight, bias, rows=(*row_inputs, *row_kw.values()),
                          row_keys=tuple(row_kw), tensors=tensors, static=static, returns=self.returns,
                          reduction=reduction, mean_weight=mean_weight, options=options, splits=False)


def _row_names(fn, count):
    params = checks.positional_names(fn)[1:]
    return [params[i] if i < len(params) else f"row input {i}" for i in range(count)]


def _class_index_form(self, hidden, weight, bias, row_inputs, kwargs, options):
    """F.cross_entropy / F.nll_loss: their keywords on the ready-made rows, one behaviour whatever the weight's
    layout (unchecked out-of-range targets give NaN); "mean" is PyTorch's weighted global mean."""
    fn = self.fn
    checks.check_keywords(self.name, fn, len(row_inputs), kwargs)
    names = checks.positional_names(fn)[1:]  # target, weight, size_average, ignore_index, ...
    if len(row_inputs) > len(names):
        raise TypeError(f"{self.name}: takes at most {len(names)} arguments after weight, got {len(row_inputs)}.")
    args = dict(zip(names, row_inputs))
    for key in kwargs:
        if key in args:
            raise TypeError(f"{self.name}: got {key!r} both positionally and as a keyword.")
    args.update(kwargs)
    if "target" not in args:
        raise TypeError(f"{self.name}: missing targets; call it as (hidden, weight, targets, ...).")
    reduction = args.get("reduction", "mean")
    if args.get("size_average") is not None or args.get("reduce") is not None:
        reduction = _reduction.legacy_get_string(args.get("size_average"), args.get("reduce"), emit_warning=False)
    static = {"ignore_index": args.get("ignore_index", -100), "upcast": self.upcast}
    rows_fn = nll_rows
    if fn is F.cross_entropy:
        rows_fn, static["label_smoothing"] = ce_rows, float(args.get("label_smoothing", 0.0))
    return fused_call(self.name, rows_fn, hidden, weight, bias, targets=args["target"],
                      ignore_index=static["ignore_index"], class_weight=args.get("weight"), class_weight_arg="weight",
                      static=static, reduction=reduction, options=options)


_KNOWN = {F.cross_entropy: _class_index_form, F.nll_loss: _class_index_form}


def _upcasting(fn):
    """``fn`` on fp32 logits (fp64 stays fp64); cached, so that one ``fn`` is one object to torch.compile."""
    try:
        return _upcasting_cached(fn)
    except TypeError:  # an unhashable callable
        return _upcast_wrapper(fn)


def _upcast_wrapper(fn):
    def upcast(logits, *row_inputs, **kwargs):
        return fn(widen(logits), *row_inputs, **kwargs)
    upcast.__name__ = getattr(fn, "__name__", type(fn).__name__)
    return upcast


_upcasting_cached = functools.cache(_upcast_wrapper)
