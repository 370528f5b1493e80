"""What a benchmarked loss family is: its inputs beyond the head's, its reference formula, its methods."""
from __future__ import annotations

import dataclasses
import importlib.util
from typing import Callable, Optional

import torch

IGNORE_INDEX = -100


@dataclasses.dataclass(frozen=True)
class Method:
    """One benchmarked implementation of a family's loss.

    make: () -> fn(hidden (N, D), weight (V, D), targets (N,), **extras) -> scalar; called in the worker
        process, so that imports of optional packages happen there.
    unavailable: device type -> None if the method can run there, else a one-line reason.
    default_on: device types where it runs when ``--methods`` is not given.
    compiles: it compiles at its first full-size call on every device, so warm-up must be full-size
        (a tiny warm-up would leave the compilation inside the measured run).
    reference: for a method that computes a variant of the family's loss (a softcapped cross-entropy, a
        reverse KL), the reference of that variant; None: the family's.
    make_at: chunk_memory -> fn, the method at that memory budget (``FusedOptions(chunk_memory=...)``):
        ``--sweep-memory`` measures a method that has one at every budget of the sweep (the time-memory curve).
    lce_compile: the method is a call of lce_compile (with the family's objective around it), not a peer's:
        ``--inside-compile`` also measures it inside ``torch.compile(fn, fullgraph=True)``, as a user's
        compiled training step calls it.
    """

    make: Callable[[], Callable]
    doc: str
    unavailable: Callable[[str], Optional[str]] = lambda device: None
    default_on: tuple = ("cpu", "cuda")
    compiles: bool = False
    reference: Optional[Callable] = None
    make_at: Optional[Callable[[float], Callable]] = None
    lce_compile: bool = False


def _no_extras(hidden, weight, targets):
    return {}


@dataclasses.dataclass(frozen=True)
class Family:
    """One ``--loss``: every method of it computes the same quantity from the same inputs.

    extras: (hidden, weight, targets) -> {name: tensor}, the loss's other inputs (a teacher, a rollout),
        seeded and built from the inputs' shapes, device and targets only; the measuring code builds them
        once per set of inputs and passes them to every method and to the reference as keywords.
    reference: fn(hidden, weight, targets, **extras) -> scalar, the unfused formula (full logits) that the
        errors are measured against, in fp64 on the CPU and in fp32 without TF32 on CUDA.
    chunkable_reference: the reference also takes ``reduction="sum"`` and is a sum over rows, so that the
        CUDA errors may compute it a few thousand rows at a time (mean = sum / kept tokens); only for a
        family without extras, which would need slicing with the rows.
    buffers: (C, V) logits buffers a chunk of the fused methods holds (2 with a teacher's), which share the
        ``chunk_memory`` budget: for the chunk sizes ``--sweep-memory`` reports.
    """

    name: str
    doc: str
    reference: Callable
    methods: dict
    extras: Callable = _no_extras
    chunkable_reference: bool = False
    buffers: int = 1

    def reference_of(self, method_name: str) -> Callable:
        return self.methods[method_name].reference or self.reference


def needs_module(*modules: str, device_types=("cuda",)):
    """``unavailable`` for a method from optional packages that runs on ``device_types`` only."""
    def check(device):
        if device not in device_types:
            return f"runs on {'/'.join(device_types)} only"
        for module in modules:
            if importlib.util.find_spec(module) is None:
                return f"{module} is not installed"
        return None
    return check


def wide_logits(hidden, weight):
    """``hidden @ weight.T`` in at least fp32: promoted rather than ``.float()``, so that fp64 inputs give an
    fp64 reference."""
    logits = hidden @ weight.T
    return logits.to(torch.promote_types(logits.dtype, torch.float32))
