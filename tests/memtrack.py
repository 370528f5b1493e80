"""Dispatch modes that see inside the fused operators, and one that records every tensor allocation: live bytes,
their peak, and the largest tensor."""
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from lce_compile.boundary import BODIES


class InsideFusedOps(TorchDispatchMode):
    """A dispatch mode that sees every op, those inside the fused operators too: a mode sees an operator as one
    op and runs it with itself set aside, so its body runs here with the mode active. Subclasses define
    ``dispatch(func, args, kwargs)``."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        body = BODIES.get(func)
        if body is not None:
            with self:
                return body(*args, **(kwargs or {}))
        return self.dispatch(func, args, kwargs or {})

    def dispatch(self, func, args, kwargs):
        return func(*args, **kwargs)


class AllocationTracker(InsideFusedOps):
    """Tracks storages that ops create while active (CPU backward runs on this thread, so it counts too).

    ``inputs``' storages are not counted (views of them are not allocations); any other storage an op
    returns is counted from its first appearance, which can only overstate the peak.
    """

    def __init__(self, inputs=()):
        super().__init__()
        self.live = self.peak = 0
        self.largest = 0          # elements of the largest tensor created
        self.sizes = []           # numel of every tensor created
        self._seen = {t.untyped_storage().data_ptr() for t in inputs}

    def dispatch(self, func, args, kwargs):
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self._track(t)
        return out

    def _track(self, t):
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in self._seen or storage.nbytes() == 0:
            return  # a view of a storage already counted
        self._seen.add(key)
        self.sizes.append(t.numel())
        self.largest = max(self.largest, t.numel())
        nbytes = storage.nbytes()
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key, nbytes)

    def _free(self, key, nbytes):
        self._seen.discard(key)
        self.live -= nbytes
