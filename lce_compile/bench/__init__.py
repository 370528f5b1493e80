"""Benchmark suite: ``python -m lce_compile.bench --help``.

For every (shape, method): the median wall time of a forward + backward step, its peak memory above
the inputs (in a fresh process, so other methods cannot pollute it), that peak over the floor (the bytes
of grad_hidden + grad_weight), and relative errors of the loss and both gradients against an fp64 (CPU) or
fp32 (CUDA) reference. ``--loss`` picks the loss family (``families.FAMILIES``: cross-entropy by default,
distillation, GRPO, DPO, token log-probs). Results print as one table per shape and are written to a JSON file.
"""
from .families import FAMILIES, Family, Method
from .run import SHAPES, main

__all__ = ["FAMILIES", "Family", "Method", "SHAPES", "main"]
