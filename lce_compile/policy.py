"""Every decision about a fused call: chunk sizes, whether and how chunk functions are compiled, accumulator
dtypes, autocast and saved-tensor hooks. ``schedule`` answers once per call; the engine then runs it.

Only this module and ``ops`` (the kernels) look at the device type or call ``torch.compile``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Callable

import torch

from . import ops

__all__ = ["FusedOptions"]

# A chunk's logits buffer, as a fraction of the weight's bytes (the weight gradient is as large). The chunk
# writes the logits' gradient over its logits, so the peak above the inputs is about (1 + this) x the
# gradients. 0.5 keeps the H200 benchmark heads within 1.5x while chunks stay large (1024-2048 rows) enough
# for full-speed matmuls and few passes over the weight gradient.
_CHUNK_MEMORY = 0.5
# The default's absolute part: at least this many bytes of logits per chunk. Half a small head is a few hundred
# rows, where a chunk's matmuls and passes run below speed to save memory that is small in absolute terms: token
# log-probs at D = 896 (Qwen2.5-0.5B's head, 0.27 GiB) took 1.54x TRL's kernel at 448-row chunks, while TRL
# spent 0.8 GiB above the gradients (H200, 2026-12-01). Heads of >= 1 GiB keep half their bytes.
_MIN_CHUNK_BYTES = 512 << 20
# The default's cap on one chunk's logits (a huge head's half would be several GiB); a chunk_memory the user
# gives is taken as is, up to one chunk of every token, the fast end (docs/benchmarks.md: the time-memory curve).
_MAX_CHUNK_BYTES = 1 << 30
# Compiled by default on CUDA only. On the CPU Inductor's C++ reductions sum a row in plain vectorized order:
# compiled chunks were as fast as the unfused code at 2**25 logits (2 cores, torch 2.13, 2026-12-01) but their
# fp32 errors were 2.6-53x the unfused code's (docs/numerics.md, 2026-12-05), so the CPU runs eager chunks
# unless FusedOptions(compile=True) asks. MPS: Inductor's Metal backend is still experimental.
_COMPILE_FROM_LOGITS = {"cuda": 0}


@dataclasses.dataclass(frozen=True)
class FusedOptions:
    """Engine knobs, shared by every fused loss. Frozen and hashable.

    Args:
        chunk_size (int, optional): rows (tokens) per chunk. Default: from ``chunk_memory``.
        chunk_memory (float, optional): the memory knob. Bytes of one chunk's ``(chunk_size, V)`` logits
            buffer, as a fraction of the weight's bytes; the peak memory above the inputs is about
            ``(1 + chunk_memory)`` times the gradients. Smaller is leaner and slower: more chunks, each
            one more pass over the weight gradient; larger is faster up to one chunk of every token.
            Any positive float: a value given is taken as is (no cap), and ``float("inf")`` puts every
            token in one chunk (the unfused code's memory: the gradients plus the ``(N, V)`` logits).
            Default on CUDA and MPS: 0.5, but at least 512 MiB and at most 1 GiB of logits (shared with a
            teacher's); on the CPU ``chunk_size`` is D / 4 rows (64 to 256), unless ``chunk_memory`` is given.
            docs/benchmarks.md measures the curve.
        compile (bool, optional): compile the chunk functions with ``torch.compile``. Default: on CUDA; on
            the CPU only when asked (Inductor's CPU sums are less precise: docs/numerics.md). ``compile=False``
            keeps the chunking, for debugging.
        validate (bool): check target values (range) before the chunk loop. This reads one scalar back
            from the device; it is skipped inside ``torch.compile``. Unchecked out-of-range targets give a
            NaN loss (never an error from inside the chunk loop). Default: ``True``.
        grad_weight_dtype (torch.dtype, optional): the weight gradient's accumulator across chunks.
            ``torch.float32`` rounds a 16-bit gradient once instead of once per chunk (TRL's choice), at the
            cost of an fp32 ``(V, D)`` buffer: twice a bf16 gradient's bytes, plus a cast. Default: fp32 on the
            CPU and MPS, the weight's dtype on CUDA.
    """

    chunk_size: int | None = None
    chunk_memory: float | None = None
    compile: bool | None = None
    validate: bool = True
    grad_weight_dtype: torch.dtype | None = None

    def __post_init__(self):
        size = self.chunk_size
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 1):
            raise ValueError(f"FusedOptions: chunk_size must be a positive int or None, got {size!r}.")
        memory = self.chunk_memory
        if memory is not None and (isinstance(memory, bool) or not isinstance(memory, (int, float))
                                   or not 0 < memory <= float("inf")):  # NaN fails too
            raise ValueError(f"FusedOptions: chunk_memory must be a positive fraction of the weight's bytes "
                             f"(float('inf'): one chunk) or None, got {memory!r}.")
        if self.compile not in (None, True, False):
            raise TypeError(f"FusedOptions: compile must be a bool or None, got {self.compile!r}.")
        if not isinstance(self.validate, bool):
            raise TypeError(f"FusedOptions: validate must be a bool, got {self.validate!r}.")
        dtype = self.grad_weight_dtype
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"FusedOptions: grad_weight_dtype must be a floating torch.dtype or None, got {dtype!r}.")


DEFAULT_OPTIONS = FusedOptions()


@dataclasses.dataclass(frozen=True)
class Schedule:
    """How one fused call runs, decided before its first chunk."""

    bounds: tuple              # (start, end) rows of each chunk
    compiled: bool             # whether the chunk step is compiled
    step: Callable             # the step for non-empty chunks (compiled, with a fallback, or eager)
    grad_weight_dtype: torch.dtype  # the weight gradient's accumulator across chunks
    device: torch.device

    def step_for(self, rows: int, eager: Callable) -> Callable:
        """The step for a chunk of ``rows`` rows: empty chunks run eagerly (no graph is worth specializing)."""
        return self.step if rows else eager

    def context(self):
        """What the loop runs within: a raised recompile limit while compiling, fp32 matmul reductions on CUDA,
        and the caller's saved-tensor hooks set aside."""
        stack = contextlib.ExitStack()
        stack.enter_context(ops.compile_context(self.compiled))
        stack.enter_context(ops.fp32_reductions(self.device))
        stack.enter_context(outside_saved_tensor_hooks())
        return stack


def schedule(step: Callable, n: int, hidden: torch.Tensor, weight: torch.Tensor, options: FusedOptions,
             buffers: int = 1) -> Schedule:
    """The schedule of a call over ``n`` rows of ``hidden (N, D)``: ``step`` is the engine's chunk step, run as is
    or compiled. ``buffers``: (C, V) logits buffers a chunk holds (1, plus one per frozen head)."""
    vocab = weight.shape[0]
    bounds = tuple(chunk_bounds(n, chunk_rows(weight, options, buffers)))
    # decided by the whole call's size, not by how many of its rows carry a loss: one shape, one decision
    compiled = wants_compile(hidden.device, options, hidden.shape[0] * vocab)
    run = chunk_function(step, compiled, hidden.device)
    return Schedule(bounds, compiled, run, grad_weight_dtype(weight, options), hidden.device)


_ONE_CHUNK = 1 << 40  # rows: more than any N, so one chunk holds every token


def chunk_rows(weight: torch.Tensor, options: FusedOptions, buffers: int = 1) -> int:
    """Rows per chunk: fixed per weight (shape, dtype, device), never a function of the number of tokens.

    ``buffers``: (C, V) logits buffers per chunk (1, plus one per frozen head such as a teacher's); the
    memory budget is shared among them.
    """
    if options.chunk_size is not None:
        return options.chunk_size
    if weight.device.type == "cpu" and options.chunk_memory is None:
        # D / 4 rows: the chunk's working set (1-2 fp32 (C, V) buffers and ~20 MiB) stays within half the
        # fp32 weight gradient (V * D * 4 bytes), and 128-256 rows keep CPU matmuls near their full speed.
        return max(16, min(256, max(64, weight.shape[1] // 4)) // buffers // 16 * 16)
    if options.chunk_memory == float("inf"):
        return _ONE_CHUNK
    row_bytes = max(weight.shape[0], 1) * weight.element_size() * buffers
    if options.chunk_memory is None:
        half = _CHUNK_MEMORY * weight.numel() * weight.element_size()
        budget = min(max(half, _MIN_CHUNK_BYTES), _MAX_CHUNK_BYTES)
    else:  # the user's budget, uncapped
        budget = options.chunk_memory * weight.numel() * weight.element_size()
    if budget / row_bytes >= _ONE_CHUNK:  # more rows than any N: one chunk
        return _ONE_CHUNK
    rows = int(budget // row_bytes)
    # whole matmul tiles where the budget allows (at least 16 rows)
    return rows // 128 * 128 if rows >= 256 else max(16, rows // 16 * 16)


def chunk_bounds(n, chunk: int):
    """(start, end) of the fewest near-equal chunks of at most ``chunk`` rows."""
    if n == 0:
        return [(0, 0)]
    count = -(-n // chunk)
    return [(k * n // count, (k + 1) * n // count) for k in range(count)]


def wants_compile(device: torch.device, options: FusedOptions, logits: int) -> bool:
    """Whether to compile the chunk functions of a call with ``logits`` = N * V elements in all."""
    if options.compile is not None:
        return options.compile
    threshold = _COMPILE_FROM_LOGITS.get(device.type)
    return threshold is not None and logits >= threshold


# Inductor stores a large elementwise expression as a (C, V) buffer once it passes ~30 ops (or is read by two
# passes and reads > 4 tensors). A chunk step is memory-bound on one or two passes over its logits, so
# recomputing is as fast (measured: JSD rows on an H200, 54.9 vs 55.3 ms) and keeps the chunk at one buffer
# (JSD: 1.48x instead of 1.95x the floor).
_STEP_OPTIONS = {"realize_opcount_threshold": 1 << 20, "realize_reads_threshold": 1 << 20}


def in_place_chunks(sched: Schedule) -> bool:
    """Whether uncompiled chunks run a row function's own step (``engine``: ``fn.eager_step``), which works in
    place of the logits: on the CPU, whose log-softmax kernel reads each row before writing it. Elsewhere (and
    compiled) the row function itself is differentiated, and Inductor fuses its passes."""
    return not sched.compiled and sched.device.type == "cpu"


def recomputes_shared_values(device: torch.device) -> bool:
    """Whether a compiled chunk step recomputes an elementwise value that two of its passes read (CUDA, with
    ``_STEP_OPTIONS``) rather than storing it as a (C, V) buffer (Inductor's CPU code stores any such value
    that takes an exp or a log)."""
    return device.type == "cuda"


@functools.cache
def _compiled(step):
    return torch.compile(step, fullgraph=True, options=_STEP_OPTIONS)


def chunk_function(step, compiled: bool, device: torch.device):
    """``step`` compiled, or ``step`` itself. Called by the fused operator's body, which a user's
    ``torch.compile`` never traces. On the CPU (compiled only when asked) a missing C++ compiler raises with
    the fix."""
    if not compiled:
        return step
    if device.type != "cpu":
        return _compiled(step)
    return functools.partial(_run_compiled, _compiled(step))


def _run_compiled(compiled, *args):
    try:
        return compiled(*args)
    except Exception as exc:
        if not _is_missing_compiler(exc):
            raise
        raise RuntimeError("lce_compile: FusedOptions(compile=True) needs a working C++ compiler on the CPU "
                           "(torch.compile's Inductor builds C++ there), and none was found: install g++ or "
                           "clang++ (or point the CXX environment variable at one), or pass "
                           "FusedOptions(compile=False).") from exc


def _is_missing_compiler(exc) -> bool:
    while exc is not None:
        if type(exc).__name__ == "InvalidCxxCompiler":
            return True
        exc = exc.__cause__ or getattr(exc, "inner_exception", None)
    return False


def mark_rows_dynamic(*tensors) -> None:
    """Compile the chunk step for any number of rows at once: chunk sizes change with N (near-equal
    chunks, and the last call's sizes), and a static first compile would be followed by a second."""
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.dim() > 0:
            torch._dynamo.maybe_mark_dynamic(t, 0)


def grad_weight_dtype(weight: torch.Tensor, options: FusedOptions) -> torch.dtype:
    """The weight gradient's accumulator across chunks: ``options.grad_weight_dtype`` if set, else this.

    fp32 on the CPU and MPS. On CUDA the weight's own dtype: an fp32 accumulator for a 16-bit weight would
    cost twice the gradient itself (the largest tensor of the call) plus a cast. cuBLAS still adds each
    chunk's product in fp32 and rounds once per chunk, so a bf16 gradient built from k chunks carries k
    roundings instead of one (measured: +5% relative error at 8 chunks, see docs/benchmarks.md).
    """
    if options.grad_weight_dtype is not None:
        return torch.promote_types(weight.dtype, options.grad_weight_dtype)  # never narrower than the weight
    if weight.device.type == "cuda":
        return weight.dtype
    return torch.promote_types(weight.dtype, torch.float32)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype ``torch.autocast`` runs matmuls in on this device, or None when it is off."""
    # is_autocast_available: a meta tensor's device has no autocast; not asked while tracing (torch 2.11's
    # Dynamo cannot trace it, and traced calls are on devices that have autocast)
    if not torch.compiler.is_compiling() and not torch.amp.is_autocast_available(device.type):
        return None
    if not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)


def autocast_input(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``t`` as autocast hands it to a matmul: floating-point tensors other than fp64 cast to ``dtype``."""
    if t is None or not t.is_floating_point() or t.dtype == torch.float64:
        return t
    return t.to(dtype)


def under_function_transform() -> bool:
    """Whether a torch.func transform (grad, vmap, ...) is running, which the engine's autograd.Function (it
    differentiates its chunks in the forward pass) cannot support."""
    if torch.compiler.is_compiling():  # tracing answers for itself
        return False
    peek = getattr(torch._C._functorch, "peek_interpreter_stack", None)
    return peek is not None and peek() is not None


@contextlib.contextmanager
def outside_saved_tensor_hooks():
    """Run the block with the caller's saved-tensor hooks set aside, and restore them after.

    The chunk loop differentiates each chunk itself (``torch.func.grad_and_value``) and saves nothing for the
    caller's autograd graph, so hooks that act on saved tensors (activation checkpointing, offloading with
    ``save_on_cpu``) have nothing to do there; torch.func refuses to run while any are set.
    """
    autograd = torch._C._autograd
    set_aside = []
    if not hasattr(autograd, "_top_saved_tensors_default_hooks"):  # a torch without the stack's accessors
        yield
        return
    while (hooks := _top_saved_tensor_hooks(autograd)) is not None:
        set_aside.append(hooks)
        autograd._pop_saved_tensors_default_hooks()
    try:
        yield
    finally:
        for pack, unpack in reversed(set_aside):
            autograd._push_saved_tensors_default_hooks(pack, unpack)


def _top_saved_tensor_hooks(autograd):
    try:
        return autograd._top_saved_tensors_default_hooks(True)  # ignore_is_tracing: the real stack
    except TypeError:  # older signature, no argument
        return autograd._top_saved_tensors_default_hooks()
