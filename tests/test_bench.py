"""End to end: ``python -m lce_compile.bench`` on a tiny shape, as a user runs it.

Tiny shapes measure process noise, not memory or speed, so only the structure of the results and the
accuracy of the fused method are checked; no timed or memory asserts.
"""
import json
import math
import os
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


def test_cli_kept_rows(tmp_path):
    """``python -m lce_compile.bench.kept``: every loss on a tiny shape, the ratios and times in its JSON."""
    cmd = [sys.executable, "-m", "lce_compile.bench.kept", "--shapes", "64x32x101", "--rounds", "1",
           "--fraction", "0.25"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "| ce | 64x32x101 | 48/64 |" in proc.stdout  # the table
    data = json.loads((tmp_path / "bench_kept.json").read_text())
    assert data["meta"]["device"] == "cpu" and data["meta"]["fraction"] == 0.25 and data["meta"]["torch"]
    results = {r["loss"]: r for r in data["results"]}
    assert list(results) == ["ce", "kd", "grpo", "logprobs"]
    for r in results.values():
        assert (r["N"], r["D"], r["V"]) == (64, 32, 101) and r["kept_rows"] == [64, 48]
        assert len(r["ratios"]) == len(r["times_none_s"]) == len(r["times_ignored_s"]) == 1
        assert r["time_none_s"] > 0 and r["time_ignored_s"] > 0
        assert r["ratio_min"] <= r["ratio"] <= r["ratio_max"]


def test_sweep_memory_budgets():
    from lce_compile.bench import sweep

    assert sweep.parse(None) == sweep.parse("default") == sweep.DEFAULT
    assert sweep.DEFAULT[0] == 0.05 and sweep.DEFAULT[-1] == math.inf
    assert sweep.parse("1,0.1,inf,0.1,one") == (0.1, 1.0, math.inf)
    for bad in ("0", "-1", "x", ","):
        with pytest.raises(ValueError, match="--sweep-memory"):
            sweep.parse(bad)
    # budgets that split the tokens alike are measured once, at the smallest; a teacher halves the chunks
    assert sweep.points((64, 32, 101), "float32", 1, (0.25, 0.5, 1.0, math.inf)) == [
        (0.25, 4, 16, [0.5]), (1.0, 2, 32, []), (math.inf, 1, 64, [])]
    assert sweep.points((64, 32, 101), "bfloat16", 2, (1.0, 4.0)) == [(1.0, 4, 16, []), (4.0, 1, 64, [])]
    assert sweep.points((8192, 4096, 128256), "bfloat16", 1, sweep.DEFAULT)[-1] == (2.0, 1, 8192, [4.0, math.inf])


def test_sweep_reach():
    """A peer point is reached by a budget of ours at no more time and no more memory."""
    from lce_compile.bench import sweep

    def rec(method, ms, mib, **kw):
        return dict(shape="s", N=8, method=method, time_s=ms / 1e3, peak_bytes=mib << 20, floor_bytes=100 << 20, **kw)

    results = [rec("liger", 55, 106), rec("compile", 39, 288), rec("fused", 72, 104, chunk_memory=0.05, chunks=43),
               rec("fused", 54, 106, chunk_memory=0.075, chunks=32), rec("fused", 40, 288, chunk_memory="inf", chunks=1)]
    found = {e["peer"]: e for e in sweep.reach(results)}
    assert found["liger"]["reached"] and found["liger"]["by"]["chunk_memory"] == 0.075
    compile_ = found["compile"]
    assert not compile_["reached"] and compile_["fastest_within_memory"]["chunk_memory"] == "inf"
    assert "leanest_within_time" not in compile_
    lines = sweep.reach_lines(sweep.reach(results))
    assert "liger 55.0 ms at 1.060x floor: reached by chunk_memory=0.075" in lines[0]
    assert "compile 39.0 ms at 2.880x floor: NOT reached; within its memory ours is chunk_memory=inf" in lines[1]


@pytest.mark.parametrize("loss", ["ce", "kd", "grpo", "dpo", "logprobs"])
def test_swept_method_at_every_budget_matches_the_reference(loss):
    """Each family's swept method computes its loss at any budget, one chunk (inf) included."""
    from lce_compile.bench import measure
    from lce_compile.bench.families import FAMILIES

    family = FAMILIES[loss]
    hidden, weight, targets = measure.make_inputs(48, 16, 67, torch.float64, torch.device("cpu"))
    extras = family.extras(hidden, weight, targets)
    swept = [name for name, m in family.methods.items() if m.make_at is not None]
    assert "fused" in swept
    gold = measure._reference(family.reference, hidden, weight, targets, extras, 48)
    for memory in (0.5, math.inf):
        got = measure._loss_and_grads(family.methods["fused"].make_at(memory), hidden, weight, targets, extras)
        for g, r in zip(got, gold):
            torch.testing.assert_close(g, r, msg=f"{loss} chunk_memory={memory}")


def test_cli_sweep_memory(tmp_path):
    """--sweep-memory: the fused method at each distinct budget in its own process, the peers once, the reach
    summary in the JSON, and the time-memory plot."""
    out, png = tmp_path / "sweep.json", tmp_path / "sweep.png"
    cmd = [sys.executable, "-m", "lce_compile.bench", "--shapes", "64,32,101", "--methods", "eager,fused",
           "--sweep-memory", "0.25,0.5,inf", "--json", str(out), "--quiet", "--plot", str(png)]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "fused @0.25 (4x16)" in proc.stdout and "fused @inf (1x64)" in proc.stdout
    assert "64x32x101 N=64: eager" in proc.stdout  # the reach summary
    data = json.loads(out.read_text())
    assert data["meta"]["sweep_memory"] == [0.25, 0.5, "inf"]
    points = [(r["method"], r.get("chunk_memory"), r.get("chunks")) for r in data["results"]]
    assert points == [("eager", None, None), ("fused", 0.25, 4), ("fused", "inf", 1)]
    for r in data["results"]:
        assert "error" not in r, r["error"]
        assert r["time_s"] > 0 and r["err_grad_weight"] < 1e-5
    assert data["results"][1]["same_chunks_as"] == [0.5]  # 0.5 x D = 16 rows too: measured once
    assert [e["peer"] for e in data["reach"]] == ["eager"]
    pytest.importorskip("matplotlib")
    assert png.stat().st_size > 0


def test_sweep_default_methods():
    """--sweep-memory without --methods: the peers and the swept method, not lce_compile's other settings."""
    from lce_compile.bench.run import parse_args

    args = parse_args(["--sweep-memory"])
    assert args.methods == ["eager", "fused"] and args.sweep_memory[-1] == math.inf
    args = parse_args(["--sweep-memory", "0.1,inf", "--loss", "kd", "--methods", "fused,fused_jsd"])
    assert args.sweep_memory == (0.1, math.inf) and args.methods == ["fused", "fused_jsd"]
    with pytest.raises(SystemExit):
        parse_args(["--sweep-memory", "--interleaved", "2"])


@pytest.mark.parametrize("loss,shape", [("ce", "64,32,101"), ("grpo", "48,16,67")])
def test_cli_inside_compile(tmp_path, loss, shape):
    """--inside-compile: each lce_compile method again inside torch.compile(fullgraph=True), in the row after its
    own, with the same errors against the reference; the other methods once."""
    out = tmp_path / "inside.json"
    cmd = [sys.executable, "-m", "lce_compile.bench", "--loss", loss, "--shapes", shape, "--methods", "eager,fused",
           "--inside-compile", "--json", str(out), "--quiet"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "fused [in compile]" in proc.stdout and "time x call" in proc.stdout
    data = json.loads(out.read_text())
    assert data["meta"]["inside_compile"] is True
    results = {r["method"]: r for r in data["results"]}
    assert list(results) == ["eager", "fused", "fused [in compile]"]
    assert results["fused [in compile]"]["inside_compile_of"] == "fused"
    assert not any("inside_compile_of" in results[name] for name in ("eager", "fused"))
    for r in results.values():
        assert "error" not in r, r["error"]  # fullgraph=True: a graph break would be an error here
        assert math.isfinite(r["time_s"]) and r["time_s"] > 0
        assert math.isfinite(r["peak_bytes"]) and r["peak_bytes"] >= 0
    eager, inside = results["fused"], results["fused [in compile]"]
    for key in ("err_loss", "err_grad_hidden", "err_grad_weight"):
        # the same call, so the same error up to fp32 rounding (the objective around it may fuse differently)
        assert inside[key] < 1e-5 and abs(inside[key] - eager[key]) < 2e-6, (key, inside[key], eager[key])


def test_inside_compile_report_ratios():
    """A "[in compile]" row's time and peak are divided by its method's eager row's, not by the baseline's."""
    from lce_compile.bench import report

    def rec(method, ms, mib, **kw):
        return dict(shape="s", N=8, D=4, V=16, method=method, time_s=ms / 1e3, peak_bytes=mib << 20,
                    floor_bytes=1 << 20, err_loss=1e-7, err_grad_hidden=1e-7, err_grad_weight=1e-7, **kw)

    results = [rec("eager", 100, 40), rec("fused", 50, 2), rec("fused [in compile]", 52, 3, inside_compile_of="fused")]
    meta = dict(device="cpu", device_name="cpu", threads=2, lce_compile="0", torch="2", dtype="float32",
                date_utc="now", skipped={})
    lines = report.tables(meta, results).splitlines()
    header = next(line for line in lines if line.startswith("method"))
    assert header.endswith("time x call  peak x call")
    row = next(line for line in lines if line.startswith("fused [in compile]"))
    assert row.split()[-2:] == ["1.04", "1.50"]
    assert next(line for line in lines if line.startswith("fused ")).split()[-1] == "1.0e-07"  # blank ratio cells


def test_inside_compile_arguments():
    from lce_compile.bench.run import parse_args

    args = parse_args(["--inside-compile", "--loss", "grpo", "--methods", "eager,fused"])
    assert args.inside_compile and args.methods == ["eager", "fused"]
    for bad in (["--inside-compile", "--methods", "eager"], ["--inside-compile", "--sweep-memory"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


def test_hf_step_compiled_on_cpu(tmp_path):
    """bench.hf_step --compile on the tiny shape: each method's model runs as torch.compile(model) (inductor, graph
    breaks allowed); the patched model's compiled step gives the unpatched one's loss, through the fused loss."""
    pytest.importorskip("transformers")
    cmd = [sys.executable, "-m", "lce_compile.bench.hf_step", "tiny-llama", "unpatched,lce_compile", "--device",
           "cpu", "--compile"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=dict(os.environ, OUT=str(tmp_path)), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    data = json.loads((tmp_path / "hf_tiny-llama_compiled.json").read_text())  # eager runs write hf_tiny-llama.json
    assert data["compiled"] is True and data["device"] == "cpu" and data["dtype"] == "float32"
    results = data["results"]
    assert list(results) == ["unpatched", "lce_compile"]
    for r in results.values():
        assert "error" not in r, r["error"]
        assert r["graphs"] >= 1 and r["ms"] > 0  # it compiled
    assert results["unpatched"]["logits_shape"] == [8, 64, 1024]
    assert results["lce_compile"]["logits_shape"] == [8, 0, 1024]  # the patch's placeholder: the fused loss ran
    torch.testing.assert_close(results["lce_compile"]["loss"], results["unpatched"]["loss"], rtol=1e-4, atol=0)
