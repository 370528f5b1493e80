"""Chunk sizes, device dispatch, and when and how chunk functions are compiled.

Only this module looks at the device type or calls ``torch.compile``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools

import torch

__all__ = ["FusedOptions"]

# Bytes of one fp32 (C, V) buffer per chunk. A compiled chunk writes the logits' gradient over the logits
# (one buffer); an eager one holds about four (autograd keeps log-probabilities and their gradient too).
_CHUNK_BYTES = {"cuda": 512 << 20, "mps": 128 << 20}
_DEFAULT_CHUNK_BYTES = 64 << 20
# Compiled by default: CUDA always; the CPU from 2**26 logits per call, where fusing the chunk's
# elementwise work pays for Inductor's C++ build (tens of seconds, once per shape); below that, eager
# chunks are as fast. MPS: Inductor's Metal backend is still experimental.
_COMPILE_FROM_LOGITS = {"cuda": 0, "cpu": 1 << 26}


@dataclasses.dataclass(frozen=True)
class FusedOptions:
    """Engine knobs, shared by every fused loss. Frozen and hashable.

    Args:
        chunk_size (int, optional): rows (tokens) per chunk. Default: from ``chunk_bytes``.
        chunk_bytes (int, optional): bytes of one fp32 ``(chunk_size, V)`` buffer; sets ``chunk_size``
            when that is not given. Default: CUDA 512 MiB, MPS 128 MiB; on the CPU ``chunk_size`` is
            D / 4 rows (64 to 256).
        compile (bool, optional): compile the chunk functions with ``torch.compile``. Default: on CUDA;
            on the CPU from 2**26 logits per call (N * V), where it is faster. ``compile=False`` keeps the
            chunking, for debugging.
        validate (bool): check target values (range) before the chunk loop. This reads one scalar back
            from the device; it is skipped inside ``torch.compile``. Default: ``True``.
    """

    chunk_size: int | None = None
    chunk_bytes: int | None = None
    compile: bool | None = None
    validate: bool = True

    def __post_init__(self):
        for name in ("chunk_size", "chunk_bytes"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"FusedOptions: {name} must be a positive int or None, got {value!r}.")
        if self.compile not in (None, True, False):
            raise TypeError(f"FusedOptions: compile must be a bool or None, got {self.compile!r}.")
        if not isinstance(self.validate, bool):
            raise TypeError(f"FusedOptions: validate must be a bool, got {self.validate!r}.")


DEFAULT_OPTIONS = FusedOptions()


def chunk_rows(vocab: int, dim: int, device: torch.device, options: FusedOptions) -> int:
    """Rows per chunk: fixed per (vocab, dim, device), never a function of the number of tokens."""
    if options.chunk_size is not None:
        return options.chunk_size
    if device.type == "cpu" and options.chunk_bytes is None:
        # D / 4 rows: the chunk's working set (1-2 fp32 (C, V) buffers and ~20 MiB) stays within half the
        # fp32 weight gradient (V * D * 4 bytes), and 128-256 rows keep CPU matmuls near their full speed.
        return min(256, max(64, dim // 4)) // 16 * 16
    budget = options.chunk_bytes or _CHUNK_BYTES.get(device.type, _DEFAULT_CHUNK_BYTES)
    rows = budget // (4 * max(vocab, 1))
    return max(16, rows // 16 * 16)


def chunk_bounds(n, chunk: int):
    """(start, end) of near-equal chunks of at most ``chunk`` rows.

    Inside ``torch.compile`` the count is a power of two: it changes only when ``n`` crosses
    ``chunk * 2**k``, so a symbolic ``n`` guards on that range rather than on ``n`` itself, and
    recompiles stay logarithmic in ``n``. Eagerly it is the smallest count that fits.
    """
    if n == 0:
        return [(0, 0)]
    if torch.compiler.is_compiling():
        count = 1
        while count * chunk < n:
            count *= 2
    else:
        count = -(-n // chunk)
    return [(k * n // count, (k + 1) * n // count) for k in range(count)]


def wants_compile(device: torch.device, options: FusedOptions, logits: int) -> bool:
    """Whether to compile the chunk functions of a call with ``logits`` = N * V elements in all."""
    if options.compile is not None:
        return options.compile
    threshold = _COMPILE_FROM_LOGITS.get(device.type)
    return threshold is not None and logits >= threshold


@functools.cache
def _compiled(step):
    return torch.compile(step, fullgraph=True)


def chunk_function(step, compiled: bool, rows: int):
    """``step`` compiled, or ``step`` itself. Empty chunks run eagerly (no graph is worth specializing
    for them). Never called inside a user's ``torch.compile``: that path is engine._traced_forward.
    """
    if rows == 0 or not compiled:
        return step
    return _compiled(step)


def compile_context(compiled: bool):
    # Each (loss function, options, dtype) combination is one cache entry of the chunk step; raise the
    # per-function limit for our call only, so that several losses in one program stay compiled.
    if not compiled:
        return contextlib.nullcontext()
    return torch._dynamo.config.patch(recompile_limit=64)


def addmm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` with ``acc`` fp32 and the product accumulated in fp32 (no low-precision partials)."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif acc.device.type == "cuda":
        # cuBLAS: low-precision inputs, fp32 output, no upcast copies (eager only: torch 2.11 cannot trace it)
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def linear(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``hidden @ weight.T + bias`` for one chunk, (C, V).

    CPU BLAS runs ``weight @ hidden.T`` (V x C, no transposed operand) 1.3-1.6x faster than
    ``hidden @ weight.T`` at chunk sizes of 128-256 rows, so there the logits are its transposed view.
    """
    if hidden.device.type != "cpu":
        return torch.nn.functional.linear(hidden, weight, bias)
    if bias is None:
        return torch.mm(weight, hidden.t()).t()
    return torch.addmm(bias.unsqueeze(1), weight, hidden.t()).t()
