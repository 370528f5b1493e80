"""The device kernels of a chunk: its matmuls, the weight-gradient sum and the upstream-gradient scale.

A leaf: it imports torch only. ``policy`` decides which chunks run and how; these run them.
"""
from __future__ import annotations

import contextlib
import functools

import torch


def compile_context(compiled: bool):
    # Each (loss function, options, dtype) combination is one cache entry of the chunk step; raise the
    # per-function limit for our call only, so that several losses in one program stay compiled.
    if not compiled:
        return contextlib.nullcontext()
    return torch._dynamo.config.patch(recompile_limit=64)


def add_product_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, first: bool) -> None:
    """``acc = a @ b`` for the first chunk, else ``acc += a @ b``, in ``acc``'s dtype: each product is reduced in
    fp32 (fp64) by the matmul and rounded once to ``acc``'s dtype, so a 16-bit ``acc`` (CUDA's default weight
    gradient) rounds once per chunk, an fp32 one (the CPU's) once at the end.

    Writing the first product (instead of adding it to zeros) saves one pass over ``acc``.
    """
    if a.dtype == acc.dtype:
        if first:
            torch.mm(a, b, out=acc)
        else:
            acc.addmm_(a, b)
        return
    if first:
        acc.zero_()
    if acc.device.type == "cuda":
        # cuBLAS: low-precision inputs, fp32 output, no upcast copies (eager only: torch 2.11 cannot trace it)
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def _scale(grads, factor):
    for g in grads:
        g.mul_(factor)


@functools.cache
def _compiled_scale():
    return torch.compile(_scale, fullgraph=True, dynamic=False)


def scale_(grads, factor: torch.Tensor) -> None:
    """``g *= factor`` in place for each gradient, ``factor`` a 0-d fp32 tensor (the upstream gradient).

    On CUDA eager ``mul_`` by a 0-d fp32 tensor takes a slow, unvectorized path for a bf16 gradient (2.5 ms
    instead of 0.55 ms for a 1.2 GB weight gradient on an H200); a compiled kernel streams at full speed.
    It is compiled for the weight gradient only, whose shape is fixed (no recompiles as N changes).
    """
    grad_h, grad_w, grad_b = grads
    if grad_w is not None and grad_w.device.type == "cuda":
        with compile_context(True):
            _compiled_scale()([grad_w], factor)
        grads = (grad_h, grad_b)
    _scale([g for g in grads if g is not None], factor)


def fp32_reductions(device: torch.device):
    """Within: CUDA matmuls of 16-bit inputs reduce their partial sums in fp32.

    PyTorch lets cuBLAS sum a split-K matmul's partial products in bf16/fp16 by default
    (``torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction``). It picks split-K for some chunk
    shapes and not for the whole-batch matmul of the unfused code (measured on an H200: (750, 256) @ (256, 8191)
    bf16 logits 27% less precise than at 1000 or 3000 rows, and a cross-entropy over them 3.4x less precise), so
    a chunked loss would be less precise than the unfused one for reasons of chunk size alone.
    """
    if device.type != "cuda":
        return contextlib.nullcontext()
    return _fp32_reductions()


@contextlib.contextmanager
def _fp32_reductions():
    flags = torch.backends.cuda.matmul
    saved = flags.allow_bf16_reduced_precision_reduction, flags.allow_fp16_reduced_precision_reduction
    flags.allow_bf16_reduced_precision_reduction = flags.allow_fp16_reduced_precision_reduction = False
    try:
        yield
    finally:
        flags.allow_bf16_reduced_precision_reduction, flags.allow_fp16_reduced_precision_reduction = saved


def linear(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           rows_contiguous: bool = False) -> torch.Tensor:
    """``hidden @ weight.T + bias`` for one chunk, (C, V).

    Some CPU BLAS (measured on AMD EPYC) run ``weight @ hidden.T`` (V x C, no transposed operand) 1.3-1.6x
    faster than ``hidden @ weight.T`` at chunk sizes of 128-256 rows, so there the logits are its transposed
    view, unless ``rows_contiguous`` asks for rows (an in-place row kernel follows). On CUDA the chunk loop runs
    within :func:`fp32_reductions`.
    """
    if hidden.device.type != "cpu" or rows_contiguous:
        return torch.nn.functional.linear(hidden, weight, bias)
    if bias is None:
        return torch.mm(weight, hidden.t()).t()
    return torch.addmm(bias.unsqueeze(1), weight, hidden.t()).t()
