"""``--sweep-memory``: the fused method at a range of memory budgets (``FusedOptions(chunk_memory=...)``), each
point in its own worker process like every other method, and which peer points the curve reaches.

A peer's point (time t, peak m) is *reached* when some budget of ours runs in time <= t at peak <= m.
"""
from __future__ import annotations

import math

import torch

# The default budgets: lean (0.05: chunks of D / 20 rows) to one chunk of every token (inf). 0.075 gives the
# 256-row chunks that Liger picks at N = 8192 for Llama-3-8B and Qwen2.5-7B (Liger sizes its chunks from N / (V / D)).
DEFAULT = (0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, math.inf)


def parse(value: str | None) -> tuple:
    """'0.1,0.5,inf' -> (0.1, 0.5, inf), ascending and without repeats; None or 'default' -> DEFAULT.
    'inf' (or 'one') is one chunk of every token."""
    if value is None or value == "default":
        return DEFAULT
    budgets = []
    for token in filter(None, (t.strip() for t in value.split(","))):
        try:
            budget = math.inf if token.lower() in ("inf", "one") else float(token)
        except ValueError:
            budget = None
        if budget is None or not budget > 0:
            raise ValueError(f"--sweep-memory: chunk_memory values are positive numbers or 'inf', got {token!r}.")
        budgets.append(budget)
    if not budgets:
        raise ValueError(f"--sweep-memory: no chunk_memory values in {value!r}.")
    return tuple(sorted(set(budgets)))


def label(budget) -> str:
    return f"{budget:g}"


def as_json(budget):
    """JSON has no infinity: one chunk is written as the string "inf"."""
    return budget if math.isfinite(budget) else "inf"


def points(shape, dtype: str, buffers: int, budgets) -> list:
    """[(chunk_memory, chunks, rows of the largest chunk, [budgets that give the same chunks]), ...] for the
    shape (N, D, V): budgets that split the N tokens alike run the same computation and are measured once, at
    the smallest of them."""
    from lce_compile import FusedOptions, policy

    n, d, v = shape
    weight = torch.empty(v, d, dtype=getattr(torch, dtype), device="meta")  # the sizes need no memory
    out = {}
    for budget in budgets:
        bounds = policy.chunk_bounds(n, policy.chunk_rows(weight, FusedOptions(chunk_memory=budget), buffers))
        chunks = (len(bounds), max(end - start for start, end in bounds))
        if chunks in out:
            out[chunks][3].append(budget)
        else:
            out[chunks] = (budget, *chunks, [])
    return list(out.values())


def reach(results: list) -> list:
    """For each shape and each peer's point: whether a budget of ours reaches it (time <= and peak <=), and if
    not, our nearest points on either side. A peer is any measured record that is not a sweep point."""
    found = []
    for shape, n in dict.fromkeys((r["shape"], r["N"]) for r in results):
        rows = [r for r in results if (r["shape"], r["N"]) == (shape, n) and r.get("time_s") and
                r.get("peak_bytes") is not None and "error" not in r]
        ours = [r for r in rows if "chunk_memory" in r]
        if not ours:
            continue
        for peer in (r for r in rows if "chunk_memory" not in r):
            t, m = peer["time_s"], peer["peak_bytes"]
            within = [o for o in ours if o["peak_bytes"] <= m]   # our points at no more memory
            faster = [o for o in ours if o["time_s"] <= t]      # our points at no more time
            both = [o for o in within if o["time_s"] <= t]
            entry = {"shape": shape, "N": n, "peer": peer["method"], "time_s": t, "peak_bytes": m,
                     "floor_bytes": peer["floor_bytes"], "reached": bool(both)}
            if both:
                entry["by"] = _brief(min(both, key=lambda o: o["time_s"]))
            else:
                if within:  # the fastest of ours within the peer's memory
                    entry["fastest_within_memory"] = _brief(min(within, key=lambda o: o["time_s"]))
                if faster:  # the leanest of ours within the peer's time
                    entry["leanest_within_time"] = _brief(min(faster, key=lambda o: o["peak_bytes"]))
            found.append(entry)
    return found


def _brief(r):
    return {"chunk_memory": r["chunk_memory"], "chunks": r.get("chunks"), "time_s": r["time_s"],
            "peak_bytes": r["peak_bytes"]}


def reach_lines(found: list) -> list:
    """One line per peer point, for the printed report."""
    lines = []
    for e in found:
        head = (f"{e['shape']} N={e['N']}: {e['peer']} {_ms(e['time_s'])} at {_x(e['peak_bytes'], e)}x floor: ")
        if e["reached"]:
            lines.append(head + f"reached by {_point(e['by'], e)}")
            continue
        near = []
        if "fastest_within_memory" in e:
            b = e["fastest_within_memory"]
            near.append(f"within its memory ours is {_point(b, e)}, {b['time_s'] / e['time_s'] - 1:+.0%} time")
        if "leanest_within_time" in e:
            b = e["leanest_within_time"]
            near.append(f"within its time ours needs {_point(b, e)}")
        lines.append(head + "NOT reached" + ("; " + "; ".join(near) if near else ""))
    return lines


def _point(b, e):
    return f"chunk_memory={b['chunk_memory']} ({b['chunks']} chunks, {_ms(b['time_s'])} at {_x(b['peak_bytes'], e)}x)"


def _ms(seconds):
    return f"{seconds * 1e3:.1f} ms"


def _x(nbytes, e):
    return f"{nbytes / e['floor_bytes']:.3f}"
