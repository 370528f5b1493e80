"""What runs inside one isolated worker process: inputs, one training step, and its measurements.

A task is a plain dict (it crosses a process boundary) and so is its result:
``{"task": "cpu" | "cuda" | "errors", "shape": (N, D, V), "device", "dtype", "seed", ...}``.
"""
from __future__ import annotations

import ctypes
import statistics
import time
import warnings

import torch

from .families import FAMILIES, IGNORE_INDEX

ERROR_ROWS = 512   # CPU: tokens the errors are measured on; an fp64 reference at full N is slow there
REFERENCE_ROWS = 4096  # CUDA: errors on all N tokens, vs an fp32 reference computed this many rows at a time
WARMUP_ROWS = 8    # a tiny step loads library code and does lazy init before anything is measured
_M_MMAP_THRESHOLD = -3  # mallopt parameter, from glibc's malloc.h


def make_inputs(n, d, v, dtype, device, seed=0):
    """Seeded ``hidden (N, D)``, ``weight (V, D)``, ``targets (N,)`` with ~10% ignored (-100)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(n, d, generator=gen, device=device)
    # |hidden row| ~ sqrt(D), so logits have std ~4: a peaked softmax, as in a trained model, not ~uniform.
    weight = torch.randn(v, d, generator=gen, device=device) * (4 / d ** 0.5)
    targets = torch.randint(0, v, (n,), generator=gen, device=device)
    targets = targets.masked_fill(torch.rand(n, generator=gen, device=device) < 0.1, IGNORE_INDEX)
    return hidden.to(dtype), weight.to(dtype), targets


def step(fn, hidden, weight, targets, extras):
    """One forward + backward of ``fn(hidden, weight, targets, **extras)``; grads are set to None first, as
    ``zero_grad()`` does."""
    hidden.grad = weight.grad = None
    loss = fn(hidden, weight, targets, **extras)
    loss.backward()
    return loss.detach()


def run_task(task: dict) -> dict:
    """Entry point in the worker; exceptions become ``{"error": ...}`` so that one method never ends a run."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for category in (DeprecationWarning, FutureWarning):  # about APIs (torch's own), not these numbers
            warnings.filterwarnings("ignore", category=category)
        try:
            result = _TASKS[task["task"]](task)
        except torch.OutOfMemoryError:
            result = {"error": "out of memory"}
        except Exception as exc:  # a third-party method may raise anything
            result = {"error": describe(exc)}
    # e.g. torch_lce warns when it falls back to its unfused path: that belongs next to its numbers
    notes = sorted({str(w.message).splitlines()[0][:200] for w in caught})
    return dict(result, warnings=notes) if notes else result


def describe(exc) -> str:
    """One line for a table or a JSON field."""
    first = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {first}"[:300]


def _setup(task):
    """(family, device, hidden, weight, targets) of a task; the family's extras are the caller's to build, on
    the rows it measures."""
    device, dtype = torch.device(task["device"]), getattr(torch, task["dtype"])
    n, d, v = task["shape"]
    hidden, weight, targets = make_inputs(n, d, v, dtype, device, task.get("seed", 0))
    return _family(task), device, hidden.requires_grad_(), weight.requires_grad_(), targets


def _family(task):
    return FAMILIES[task.get("loss", "ce")]


def _make(method, chunk_memory=None, inside_compile=False):
    """The method's fn; at a memory budget (``--sweep-memory``) when ``chunk_memory`` is given; inside
    ``torch.compile(fn, fullgraph=True)`` with ``inside_compile`` (``--inside-compile``)."""
    fn = method.make() if chunk_memory is None else method.make_at(chunk_memory)
    # The forward alone, as a user compiles a model's forward: step() calls backward on the result eagerly, which
    # runs the backward graph that the compile recorded. fullgraph: a graph break raises, rather than running the
    # call eagerly under this row's name.
    return torch.compile(fn, fullgraph=True) if inside_compile else fn


IN_COMPILE = " [in compile]"  # suffix of a method measured inside torch.compile (--inside-compile)


def point_key(name, chunk_memory=None, inside_compile=False) -> str:
    """How a (method, budget) point is named in the errors' result and the records: ``fused``, ``fused@0.25``,
    ``fused@inf``, and inside torch.compile ``fused [in compile]``."""
    return (name if chunk_memory is None else f"{name}@{chunk_memory:g}") + (IN_COMPILE if inside_compile else "")


def _warm_up(fn, family, compiles, hidden, weight, targets, extras, full_runs):
    """Warm up tiny (code pages, lazy init), or full-size when the fn compiles at its first full call."""
    if full_runs and (compiles or hidden.device.type == "cuda"):
        for _ in range(full_runs):
            step(fn, hidden, weight, targets, extras)
    else:  # twice: a fresh process's second step can still pay one-time costs (a few ms; noise at tiny N)
        tiny = hidden[:WARMUP_ROWS].detach().requires_grad_(), weight, targets[:WARMUP_ROWS]
        tiny_extras = family.extras(*tiny)  # the extras of WARMUP_ROWS tokens (e.g. a rollout's sequences)
        for _ in range(2):
            step(fn, *tiny, tiny_extras)
    hidden.grad = weight.grad = None


_CPU_MIN_TIMED_S = 6.0


def _cpu(task):
    """CPU, in a process of its own: peak resident memory of one full step above the inputs, and the
    wall time of that step and of ``repeat - 1`` more (median)."""
    # Without this, glibc keeps freed buffers of up to 32 MiB resident for reuse, and RSS would count
    # memory that is free: with a fixed 64 KiB threshold every large buffer is mmapped and returned.
    # (The same as MALLOC_MMAP_THRESHOLD_=65536, which a forked worker would read too late.) It makes
    # small allocations slower, which can only understate a chunked method's speed.
    ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, 65536)
    family, _, hidden, weight, targets = _setup(task)
    extras = family.extras(hidden, weight, targets)  # before the peak's baseline: inputs, not the step's
    method, inside = family.methods[task["method"]], task.get("inside_compile", False)
    fn = _make(method, task.get("chunk_memory"), inside)
    # inside a compile: full-size, or the timed step would compile again (a dynamic shape) after the tiny one
    _warm_up(fn, family, method.compiles or inside, hidden, weight, targets, extras, full_runs=task["warmup"])
    base = _proc_status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM (the peak RSS) to the current RSS
    times = []
    # at least `repeat` steps, and short steps until ~6 s of them: one 2 s step moves by +-10% run to run
    while len(times) < task["repeat"] or (sum(times) < _CPU_MIN_TIMED_S and len(times) < 9):
        start = time.perf_counter()
        step(fn, hidden, weight, targets, extras)
        times.append(time.perf_counter() - start)
        if len(times) == 1:
            peak = (_proc_status_kib("VmHWM") - base) * 1024
    return {"peak_bytes": peak, "time_s": statistics.median(times), "times_s": times}


def _proc_status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _cuda(task):
    """CUDA: the first step (compilation included), peak allocated memory of one step above the inputs,
    the median of timed steps; then the same for the forward pass alone, under ``torch.no_grad()``."""
    family, device, hidden, weight, targets = _setup(task)
    extras = family.extras(hidden, weight, targets)
    fn = _make(family.methods[task["method"]], task.get("chunk_memory"), task.get("inside_compile", False))
    # no tiny warm-up: a compiled method would compile for it and again (with dynamic shapes) for N
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    step(fn, hidden, weight, targets, extras)
    torch.cuda.synchronize(device)
    first_call = time.perf_counter() - start
    for _ in range(task["warmup"] - 1):
        step(fn, hidden, weight, targets, extras)
    hidden.grad = weight.grad = None  # the peak is measured above the inputs alone
    peak, times = _cuda_timed(lambda: step(fn, hidden, weight, targets, extras), device, task["repeat"])
    with torch.no_grad():
        for _ in range(2):
            fn(hidden, weight, targets, **extras)
        forward_peak, forward_times = _cuda_timed(lambda: fn(hidden, weight, targets, **extras), device,
                                                  task["repeat"])
    return {"peak_bytes": peak, "time_s": statistics.median(times), "times_s": times, "first_call_s": first_call,
            "forward_peak_bytes": forward_peak, "forward_time_s": statistics.median(forward_times),
            "device_name": torch.cuda.get_device_name(device)}


def _cuda_timed(run, device, repeat):
    """(peak allocated bytes of one call above what was allocated before it, [wall time of ``repeat`` calls])."""
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    run()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    times = []
    for _ in range(repeat):
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        run()
        torch.cuda.synchronize(device)  # wall time of a whole step, as a training loop sees it
        times.append(time.perf_counter() - start)
    return peak, times


def _errors(task):
    """Relative errors of every method vs a high-precision reference.

    CPU: on the first ERROR_ROWS tokens, vs fp64. CUDA: on all tokens (so the chunks are the same as in
    the timed run), vs fp32 without TF32, computed REFERENCE_ROWS rows at a time (fp32 gradient sums).
    All methods share one process: the reference is the expensive part, computed once per reference.
    """
    family, device, hidden, weight, targets = _setup(task)
    if device.type != "cuda":
        hidden, targets = hidden[:ERROR_ROWS], targets[:ERROR_ROWS]
    extras = family.extras(hidden, weight, targets)  # of the rows measured, shared by methods and references
    rows = REFERENCE_ROWS if family.chunkable_reference else hidden.shape[0]
    golds, out = {}, {}  # golds: reference fn -> (loss, grad_hidden, grad_weight)
    # (method, None, False) for each method, then (method, chunk_memory, False) for each point of a
    # --sweep-memory, then (method, None, True) for each method of --inside-compile
    points = ([(name, None, False) for name in task["methods"]] + [(*p, False) for p in task.get("points", ())]
              + [(name, None, True) for name in task.get("inside_compile", ())])
    for name, memory, inside in points:
        reference = family.reference_of(name)
        key = point_key(name, memory, inside)
        try:
            if reference not in golds:
                golds[reference] = _reference(reference, hidden, weight, targets, extras, rows)
            if inside:  # compiled afresh, as in its own process: methods built on one function share its cache
                torch.compiler.reset()
            got = _loss_and_grads(_make(family.methods[name], memory, inside), hidden, weight, targets, extras)
            out[key] = {f"err_{k}": _relative_error(g, r) for k, g, r in zip(_KEYS, got, golds[reference])}
            del got
        except Exception as exc:  # one failing method keeps the others' errors
            out[key] = {"error": describe(exc)}
    return {"errors": out}


def _reference(fn, hidden, weight, targets, extras, rows):
    """(loss, grad_hidden, grad_weight) of ``fn`` in fp64 (CPU) or fp32 without TF32 (CUDA). ``rows`` below N:
    a sum-reducible reference runs that many rows at a time; else one call of the mean, as the methods make.
    The extras are passed as they are: the references widen them as the methods do (a teacher to the
    student's dtype, fp32 advantages by type promotion)."""
    dtype = torch.float32 if hidden.device.type == "cuda" else torch.float64
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        if rows >= hidden.shape[0]:
            return _loss_and_grads(fn, hidden.to(dtype), weight.to(dtype), targets, extras)
        hidden_ref = hidden.detach().to(dtype).requires_grad_()
        weight_ref = weight.detach().to(dtype).requires_grad_()
        kept = (targets != IGNORE_INDEX).sum()
        total = 0.0
        for start in range(0, hidden.shape[0], rows):
            part = slice(start, start + rows)
            loss = fn(hidden_ref[part], weight_ref, targets[part], reduction="sum") / kept  # (no extras)
            loss.backward()  # weight_ref.grad sums the chunks
            total = total + loss.detach()
        return total, hidden_ref.grad, weight_ref.grad
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


_KEYS = ("loss", "grad_hidden", "grad_weight")


def _loss_and_grads(fn, hidden, weight, targets, extras):
    hidden, weight = hidden.detach().requires_grad_(), weight.detach().requires_grad_()  # fresh leaves
    loss = step(fn, hidden, weight, targets, extras)
    return loss, hidden.grad, weight.grad


def _relative_error(got, want):
    """||got - want|| / ||want|| in fp64; for the loss, a scalar, that is |got - want| / |want|."""
    want = want.double()
    return ((got.double() - want).norm() / want.norm()).item()


_TASKS = {"cpu": _cpu, "cuda": _cuda, "errors": _errors}


def child(task: dict, conn) -> None:
    """Target of a worker process: run one task and send its result dict back through ``conn``."""
    conn.send(run_task(task))
    conn.close()
