"""End to end: ``python -m lce_compile.bench`` on a tiny shape, as a user runs it.

Tiny shapes measure process noise, not memory or speed, so only the structure of the results and the
accuracy of the fused method are checked; no timed or memory asserts.
"""
import json
import subprocess
import sys

import pytest
import torch

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


@pytest.mark.parametrize("loss,methods", [("kd", "eager,fused,fused_reverse_kl,fused_jsd"), ("grpo", "eager,fused"),
                                          ("dpo", "eager,fused"), ("logprobs", "eager,fused")])
def test_cli_other_losses(tmp_path, loss, methods):
    out = tmp_path / f"{loss}.json"
    cmd = [sys.executable, "-m", "lce_compile.bench", "--loss", loss, "--shapes", "48,16,67", "--methods",
           methods, "--json", str(out), "--quiet"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert data["meta"]["loss"] == loss
    results = {r["method"]: r for r in data["results"]}
    assert list(results) == methods.split(",") and not any("error" in r for r in results.values())
    for name in results:
        for key in ("err_loss", "err_grad_hidden", "err_grad_weight"):
            assert results[name][key] < 1e-5, (name, key, results[name][key])


@pytest.mark.parametrize("loss", ["ce", "kd", "grpo", "dpo", "logprobs"])
def test_references_measure_what_the_methods_compute(loss):
    """Each method's error column is against a reference of the same quantity: the eager method run in fp64
    equals the reference (which the CUDA path runs in fp32, chunked for the cross-entropy), on the same inputs
    (the eager cross-entropy computes in fp32: the tolerance is fp32's, far below a wrong reference)."""
    from lce_compile.bench import measure
    from lce_compile.bench.families import FAMILIES

    family = FAMILIES[loss]
    hidden, weight, targets = measure.make_inputs(48, 16, 67, torch.float32, torch.device("cpu"))
    extras = family.extras(hidden, weight, targets)
    rows = 16 if family.chunkable_reference else 48
    for name, method in family.methods.items():
        if method.unavailable("cpu") or method.compiles and name != "fused":
            continue
        gold = measure._reference(family.reference_of(name), hidden, weight, targets, extras, rows)
        got = measure._loss_and_grads(method.make(), hidden.double(), weight.double(), targets, extras)
        for g, r in zip(got, gold):
            torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-6, msg=f"{loss} {name}")  # eager CE upcasts to fp32 only


@pytest.mark.parametrize("loss", ["ce", "kd", "grpo", "dpo", "logprobs"])
def test_extras_are_built_from_the_inputs_alone(loss):
    """No cache between calls: a family's extra inputs are a seeded function of the inputs, equal on every call."""
    from lce_compile.bench import measure
    from lce_compile.bench.families import FAMILIES

    inputs = measure.make_inputs(2048, 8, 50, torch.float32, torch.device("cpu"))
    first, second = FAMILIES[loss].extras(*inputs), FAMILIES[loss].extras(*inputs)
    assert list(first) == list(second) and all(torch.equal(first[k], second[k]) for k in first)


def test_cli_interleaved_mode(tmp_path):
    cmd = [sys.executable, "-m", "lce_compile.bench", "--interleaved", "2", "--shapes", "64,32,101", "--methods",
           "eager,fused"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "64x32x101: fused / eager = " in proc.stdout and "median of 2 rounds" in proc.stdout
    assert not (tmp_path / "bench_results.json").exists()  # a timing mode: no result file
