"""No (N, V) tensor, forward or backward; the peak above the inputs is the gradients plus a chunk budget."""
import pytest
import torch
import torch.nn.functional as F

from lce_compile import FusedOptions, fused_loss, linear_cross_entropy
from memtrack import AllocationTracker
from lce_compile.testing import make_inputs

D, V, CHUNK = 64, 8192, 32
# Eager chunks: a dispatch mode sees every allocation of eager code (a compiled chunk's internal buffers
# are invisible to it), and eager chunks hold more (C, V) buffers than compiled ones.
OPTIONS = FusedOptions(chunk_size=CHUNK, compile=False)
CHUNK_BYTES = CHUNK * V * 4     # one fp32 (C, V) buffer
# (C, V) buffers alive at once inside an eager chunk: logits, softcapped logits and their tanh, log-probs,
# and their gradients; compiled chunks fuse most of them away
BUFFERS = 10


def _measure(loss_fn, n, dtype=torch.float32, **kw):
    hidden, weight, targets = make_inputs(n, D, V, dtype)
    hidden.requires_grad_(), weight.requires_grad_()
    with AllocationTracker(inputs=(hidden, weight, targets)) as tracker:
        loss = loss_fn(hidden, weight, targets, **kw)
        loss.backward()
    grad_bytes = hidden.grad.nbytes + weight.grad.nbytes
    return tracker, grad_bytes


LOSSES = {
    "linear_cross_entropy": lambda h, w, t: linear_cross_entropy(
        h, w, t, softcap=20.0, z_loss=1e-4, options=OPTIONS),
    "fused_loss(F.cross_entropy)": lambda h, w, t: fused_loss(F.cross_entropy)(
        h, w, t, label_smoothing=0.1, options=OPTIONS),
    "reduction='none'": lambda h, w, t: linear_cross_entropy(
        h, w, t, reduction="none", options=OPTIONS).sum(),
}


@pytest.mark.parametrize("name", list(LOSSES))
def test_peak_is_gradients_plus_chunk_budget(name):
    n = 4096  # full fp32 logits: 134 MB, 12.8x the chunk budget
    assert n * V * 4 >= 10 * BUFFERS * CHUNK_BYTES
    tracker, grad_bytes = _measure(LOSSES[name], n)
    assert tracker.largest < n * V // 10, f"a tensor of {tracker.largest} elements was allocated"
    assert tracker.peak <= grad_bytes + BUFFERS * CHUNK_BYTES, (
        f"peak {tracker.peak / 1e6:.1f} MB > gradients {grad_bytes / 1e6:.1f} MB + "
        f"{BUFFERS} x chunk {CHUNK_BYTES / 1e6:.1f} MB")


def test_peak_does_not_grow_with_tokens():
    small, small_grads = _measure(LOSSES["linear_cross_entropy"], 1024)
    large, large_grads = _measure(LOSSES["linear_cross_entropy"], 8192)
    # only grad_hidden and O(N) vectors (targets, masks, the kept rows' index: < 48 bytes a row, against
    # D * 4 = 256 for a hidden row) grow with N; the chunk part stays put
    growth = (large.peak - large_grads) - (small.peak - small_grads)
    assert growth <= 8192 * 48, f"chunk memory grew by {growth / 1e6:.2f} MB from N=1024 to N=8192"


def test_weight_gradient_is_not_copied():
    """One (V, D) buffer is allocated in fp32: the accumulator that becomes weight.grad."""
    tracker, _ = _measure(LOSSES["linear_cross_entropy"], 1024)
    assert sum(size == V * D for size in tracker.sizes) == 1


def test_tracker_sees_the_unfused_logits():
    """The same measurement on the unfused code finds the (N, V) logits: the tracker can fail."""
    tracker, grad_bytes = _measure(lambda h, w, t: F.cross_entropy(h @ w.T, t), 4096)
    assert tracker.largest >= 4096 * V
    assert tracker.peak > grad_bytes + BUFFERS * CHUNK_BYTES
