"""Chunk sizes, device dispatch, and when and how chunk functions are compiled.

Only this module looks at the device type or calls ``torch.compile``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools

import torch

__all__ = ["FusedOptions"]

# Bytes of one fp32 (C, V) buffer per chunk; a chunk holds a few such buffers (logits, their gradient).
# CPU: small enough that the peak stays within 1.5x the gradient bytes at V ~ 50k (see docs/design.md).
_CHUNK_BYTES = {"cuda": 512 << 20, "cpu": 24 << 20, "mps": 128 << 20}
_DEFAULT_CHUNK_BYTES = 64 << 20
# Whether chunk functions are compiled by default. CPU: eager chunks already match the unfused code
# (the matmuls dominate) and Inductor's C++ build costs tens of seconds per shape; MPS: Inductor's
# Metal backend is still experimental.
_COMPILE_BY_DEFAULT = {"cuda": True}


@dataclasses.dataclass(frozen=True)
class FusedOptions:
    """Engine knobs, shared by every fused loss. Frozen and hashable.

    Args:
        chunk_size (int, optional): rows (tokens) per chunk. Default: from ``chunk_bytes``.
        chunk_bytes (int, optional): bytes of one fp32 ``(chunk_size, V)`` buffer; sets ``chunk_size``
            when that is not given. Default: per device (CUDA 512 MiB, CPU 24 MiB, MPS 128 MiB).
        compile (bool, optional): compile the chunk functions with ``torch.compile``. Default: on CUDA
            only. ``compile=False`` keeps the chunking, for debugging.
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


def chunk_rows(vocab: int, device: torch.device, options: FusedOptions) -> int:
    """Rows per chunk: fixed per (vocab, device), never a function of the number of tokens."""
    if options.chunk_size is not None:
        return options.chunk_size
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


def wants_compile(device: torch.device, options: FusedOptions) -> bool:
    if options.compile is not None:
        return options.compile
    return _COMPILE_BY_DEFAULT.get(device.type, False)


@functools.cache
def _compiled(step):
    return torch.compile(step, fullgraph=True)


def chunk_function(step, device: torch.device, options: FusedOptions, rows: int):
    """``step`` compiled for this device, or ``step`` itself.

    Inside a user's ``torch.compile`` the compiled wrapper is inlined into the user's graph. Empty
    chunks run eagerly (no graph is worth specializing for them).
    """
    if rows == 0 or not wants_compile(device, options):
        return step
    return _compiled(step)


def compile_context(device: torch.device, options: FusedOptions):
    # Each (loss function, options, dtype) combination is one cache entry of the chunk step; raise the
    # per-function limit for our call only, so that several losses in one program stay compiled.
    if torch.compiler.is_compiling() or not wants_compile(device, options):
        return contextlib.nullcontext()
    return torch._dynamo.config.patch(recompile_limit=64)


def addmm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` with ``acc`` fp32 and the product accumulated in fp32 (no low-precision partials)."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif acc.device.type == "cuda":
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
