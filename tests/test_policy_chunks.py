"""Chunk sizes (policy.chunk_rows): the default's 512 MiB floor and 1 GiB cap, a user's chunk_memory taken as is, and
one chunk.

Meta tensors: the sizes depend on the weight's shape, dtype and device type only, so no memory is allocated.
"""
import math

import pytest
import torch

from lce_compile import FusedOptions, policy
from lce_compile.policy import chunk_bounds, chunk_rows


def _weight(v, d, dtype=torch.bfloat16):
    return torch.empty(v, d, dtype=dtype, device="meta")  # not "cpu": the CPU default is D / 4 rows


@pytest.mark.parametrize("v,d,rows", [(256000, 2304, 1152), (128256, 4096, 2048), (152064, 3584, 1792)])
def test_default_is_half_the_weight(v, d, rows):
    """The benchmark heads' default chunks (docs/design.md): chunk_memory 0.5, whole 128-row tiles."""
    assert chunk_rows(_weight(v, d), FusedOptions()) == rows


@pytest.mark.parametrize("v,d", [(151936, 896), (151936, 1536), (32000, 64)])
def test_default_has_an_absolute_part(v, d):
    """A small head's half is a few hundred rows: the default chunk holds at least 512 MiB of logits instead (one
    chunk of every token for a tiny head), whole 128-row tiles; shared with a teacher's buffer."""
    weight = _weight(v, d)
    rows = chunk_rows(weight, FusedOptions())
    assert rows * v * 2 <= policy._MIN_CHUNK_BYTES < (rows + 128) * v * 2
    assert rows > chunk_rows(weight, FusedOptions(chunk_memory=0.5))
    assert chunk_rows(weight, FusedOptions(), buffers=2) * v * 2 * 2 <= policy._MIN_CHUNK_BYTES
    assert chunk_rows(_weight(151936, 896), FusedOptions()) == 1664  # Qwen2.5-0.5B: 448 rows at half its head


def test_default_stays_capped_at_1_gib():
    """A head whose half is past 1 GiB: the default chunk is 1 GiB of logits, as before."""
    weight = _weight(256000, 16384)  # 8 GiB of bf16 weight
    rows = chunk_rows(weight, FusedOptions())
    assert rows * 256000 * 2 <= policy._MAX_CHUNK_BYTES and rows == 2048
    assert chunk_rows(weight, FusedOptions(chunk_memory=None)) == rows


def test_given_chunk_memory_is_not_capped():
    """A budget the user gives is a fraction of the weight's bytes, taken as is beyond 1 GiB."""
    weight = _weight(128256, 4096)
    assert chunk_rows(weight, FusedOptions(chunk_memory=0.5)) == 2048  # = the default below the cap
    assert chunk_rows(weight, FusedOptions(chunk_memory=2)) == 8192  # 2 GiB of logits: was capped at 4096
    assert chunk_rows(weight, FusedOptions(chunk_memory=16)) == 16 * 4096
    assert chunk_rows(weight, FusedOptions(chunk_memory=2), buffers=2) == 4096  # shared with a teacher's buffer
    assert chunk_rows(weight, FusedOptions(chunk_memory=0.05)) == 192  # lean: whole 16-row tiles below 256


@pytest.mark.parametrize("memory", [float("inf"), 1e30])
def test_infinite_chunk_memory_is_one_chunk(memory):
    for weight in (_weight(128256, 4096), _weight(101, 32, torch.float32), torch.empty(101, 32)):
        rows = chunk_rows(weight, FusedOptions(chunk_memory=memory))
        assert rows == policy._ONE_CHUNK
        for n in (1, 8192, 10 ** 9):
            assert chunk_bounds(n, rows) == [(0, n)]


def test_cpu_default_unchanged():
    assert chunk_rows(torch.empty(32768, 512), FusedOptions()) == 128
    assert chunk_rows(torch.empty(32768, 512), FusedOptions(chunk_memory=0.5)) == 256  # 0.5 * 512 rows


def test_empty_weight():
    assert chunk_rows(_weight(0, 0), FusedOptions(chunk_memory=math.inf)) == policy._ONE_CHUNK
    assert chunk_rows(_weight(0, 16), FusedOptions(chunk_memory=1.0)) == 16


@pytest.mark.parametrize("memory", [0, -1.0, float("nan"), -math.inf, True, "0.5"])
def test_chunk_memory_validation(memory):
    with pytest.raises(ValueError, match=r"chunk_memory must be a positive fraction of the weight's bytes"):
        FusedOptions(chunk_memory=memory)


@pytest.mark.parametrize("memory", [1e-3, 0.5, 4, 5.0, 100, math.inf])
def test_chunk_memory_accepted(memory):
    assert FusedOptions(chunk_memory=memory).chunk_memory == memory


def test_one_chunk_matches_the_unfused_loss():
    """float("inf") runs the whole call as one chunk, with the same result as small chunks."""
    from lce_compile import linear_cross_entropy

    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(300, 32, generator=gen, requires_grad=True)
    weight = torch.randn(101, 32, generator=gen, requires_grad=True)
    targets = torch.randint(0, 101, (300,), generator=gen)
    out = []
    for options in (FusedOptions(chunk_memory=math.inf), FusedOptions(chunk_size=64)):
        hidden.grad = weight.grad = None
        loss = linear_cross_entropy(hidden, weight, targets, options=options)
        loss.backward()
        out.append((loss.detach(), hidden.grad, weight.grad))
    logits = hidden.detach().double() @ weight.detach().double().T
    torch.testing.assert_close(out[0][0].double(), torch.nn.functional.cross_entropy(logits, targets))
    for a, b in zip(*out):
        torch.testing.assert_close(a, b)
