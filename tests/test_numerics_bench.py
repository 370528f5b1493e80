"""``python -m lce_compile.bench.numerics`` on a tiny CPU shape: every output is in the table, with finite errors.

Tiny shapes make the error ratios noise, so only the structure and finiteness are checked here; the accuracy
contract itself is tested in test_cross_entropy.py and test_rl.py.
"""
import json
import math

from lce_compile.bench import numerics

OUTPUTS = {"cross_entropy": ("loss", "lse", "grad_hidden", "grad_weight", "grad_bias"),
           "logprobs": ("logprobs", "entropy", "grad_hidden", "grad_weight", "grad_bias")}


def test_numerics_tiny_cpu(tmp_path, capsys):
    path = tmp_path / "numerics.json"
    data = numerics.main(["--shape", "48,16,67", "--quiet", "--json", str(path)])
    printed = capsys.readouterr().out
    assert json.loads(path.read_text()) == json.loads(json.dumps(data))
    assert data["meta"]["chunks"] == [1, 8, 32] and data["chunk_rows"] == {"1": 48, "8": 6, "32": 2}
    assert data["chunks_run"] == {"1": 1, "8": 8, "32": 24}  # 2-row chunks: 24 of them
    for family, outputs in OUTPUTS.items():
        for dtype in ("fp32", "bf16"):
            for out in outputs:
                rows = [e for e in data["errors"]
                        if (e["family"], e["output"], e["dtype"]) == (family, out, dtype)]
                methods = sorted((e["method"], e.get("chunks", 0)) for e in rows)
                assert methods == [("fused", 1), ("fused", 8), ("fused", 32), ("unfused", 0),
                                   ("unfused_add_bias", 0)], (family, out, dtype, methods)
                assert all(math.isfinite(e["error"]) for e in rows), rows
                assert out in data["accumulation"][dtype]
            assert f"| {'ce' if family == 'cross_entropy' else family}: grad_bias |" in printed
        inv = {(i["output"], i["dtype"], i["chunks"]) for i in data["invariance"] if i["family"] == family}
        assert inv == {(o, d, k) for o in outputs for d in ("fp32", "bf16") for k in (8, 32)}
    # the CPU's default weight-gradient sum is fp32; the bf16 rows also show CUDA's default, a bf16 sum
    assert data["accumulation"]["bf16"]["grad_weight"].startswith("fp32")
    assert any(e["output"] == "grad_weight (bf16 sum)" for e in data["errors"])
    assert all(math.isfinite(i["max_abs_diff"]) for i in data["invariance"])
    for dtype in ("fp32", "bf16"):
        assert f"{dtype}:" in printed
    assert "Chunk-count invariance" in printed
