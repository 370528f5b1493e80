"""End to end: ``python -m lce_compile.bench`` on a tiny shape, as a user runs it.

Tiny shapes measure process noise, not memory or speed, so only the structure of the results and the
accuracy of the fused method are checked; no timed or memory asserts.
"""
import json
import subprocess
import sys

import pytest

from lce_compile.bench.run import parse_shapes


def test_cli_end_to_end(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "lce_compile.bench", "--shapes", "64,32,101", "--methods", "eager,fused",
           "--json", str(out), "--quiet"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "64x32x101" in proc.stdout and "err grad_w" in proc.stdout  # the table
    data = json.loads(out.read_text())
    assert data["meta"]["device"] == "cpu" and data["meta"]["dtype"] == "float32"
    results = {r["method"]: r for r in data["results"]}
    assert list(results) == ["eager", "fused"]
    for r in results.values():
        assert "error" not in r, r["error"]
        assert (r["N"], r["D"], r["V"]) == (64, 32, 101)
        assert r["floor_bytes"] == (64 * 32 + 101 * 32) * 4
        assert r["time_s"] > 0 and r["peak_bytes"] >= 0
    for key in ("err_loss", "err_grad_hidden", "err_grad_weight"):
        assert results["fused"][key] < 1e-5, (key, results["fused"][key])


def test_parse_shapes():
    assert parse_shapes(["cpu-small,64x32x101", "1,2,3;4,5,6"]) == [
        ("cpu-small", (2048, 512, 32768)), ("64x32x101", (64, 32, 101)), ("1x2x3", (1, 2, 3)),
        ("4x5x6", (4, 5, 6))]
    with pytest.raises(ValueError, match="three integers"):
        parse_shapes(["64,32"])
    with pytest.raises(ValueError, match="unknown shape 'nope'"):
        parse_shapes(["nope"])


def test_interleaved_ratios_structure():
    from lce_compile.bench.interleaved import ratios

    out = ratios((64, 32, 101), ["eager", "fused"], rounds=2)
    assert list(out) == ["fused"] and len(out["fused"]) == 2 and all(r > 0 for r in out["fused"])


@pytest.mark.parametrize("loss", ["kd", "grpo"])
def test_cli_other_losses(tmp_path, loss):
    out = tmp_path / f"{loss}.json"
    cmd = [sys.executable, "-m", "lce_compile.bench", "--loss", loss, "--shapes", "48,16,67", "--methods",
           "eager,fused", "--json", str(out), "--quiet"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert data["meta"]["loss"] == loss
    results = {r["method"]: r for r in data["results"]}
    assert list(results) == ["eager", "fused"] and not any("error" in r for r in results.values())
    for key in ("err_loss", "err_grad_hidden", "err_grad_weight"):
        assert results["fused"][key] < 1e-5, (key, results["fused"][key])
