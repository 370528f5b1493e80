"""Progress lines, result tables and the optional plot."""
from __future__ import annotations

import sys

MIB = 1 << 20
COLUMNS = ("method", "time", "x {base}", "peak MiB", "x floor", "err loss", "err grad_h", "err grad_w")


def progress_line(r: dict) -> str:
    line = (f"[{r['shape']}] {r['method']}: {_time(r.get('time_s'))}, peak {_mib(r.get('peak_bytes'))} MiB "
            f"({_ratio(r.get('peak_bytes'), r['floor_bytes'])} x floor), err loss/grad_h/grad_w "
            f"{_err(r.get('err_loss'))}/{_err(r.get('err_grad_hidden'))}/{_err(r.get('err_grad_weight'))}")
    return line + (f"  ERROR {r['error']}" if "error" in r else "")


def tables(meta: dict, results: list) -> str:
    """The header, then one table per shape, each followed by its errors and warnings."""
    threads = f" ({meta['threads']} threads)" if meta["device"] == "cpu" else ""
    out = [f"lce_compile {meta['lce_compile']} bench | {meta['device']}: {meta['device_name']}{threads} "
           f"| torch {meta['torch']} | {meta['dtype']} | {meta['date_utc']}"]
    for name, reason in meta["skipped"].items():
        out.append(f"skipped {name}: {reason}")
    for shape in dict.fromkeys(r["shape"] for r in results):
        out += [""] + _shape_table([r for r in results if r["shape"] == shape])
    return "\n".join(out)


def _shape_table(rows: list) -> list:
    first = rows[0]
    base = _baseline(rows)
    lines = [f"{first['shape']}: N={first['N']} D={first['D']} V={first['V']}, "
             f"floor (grad_hidden + grad_weight) {_mib(first['floor_bytes'])} MiB"]
    cells = [[c.format(base=base["method"] if base else "eager") for c in COLUMNS]]
    for r in rows:
        cells.append([r["method"], _time(r.get("time_s")), _ratio(r.get("time_s"), base and base.get("time_s")),
                      _mib(r.get("peak_bytes")), _ratio(r.get("peak_bytes"), r["floor_bytes"]),
                      _err(r.get("err_loss")), _err(r.get("err_grad_hidden")), _err(r.get("err_grad_weight"))])
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    for row in cells:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    for r in rows:
        if "error" in r:
            lines.append(f"  {r['method']}: ERROR {r['error']}")
        for warning in r.get("warnings", []):
            lines.append(f"  {r['method']}: warning: {warning}")
    return lines


def _baseline(rows):
    """The ratio column's reference: compile when it ran (the strong unfused baseline), else eager."""
    for name in ("compile", "eager"):
        for r in rows:
            if r["method"] == name and r.get("time_s"):
                return r
    return None


def _time(seconds):
    if seconds is None:
        return "-"
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _mib(nbytes):
    return "-" if nbytes is None else f"{nbytes / MIB:.1f}"


def _ratio(value, base):
    return "-" if value is None or not base else f"{value / base:.2f}"


def _err(value):
    return "-" if value is None else f"{value:.1e}"


def plot(results: list, path: str, meta: dict) -> None:
    """Two panels, time and peak memory: one group of bars per shape, one bar per method."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only; never needs a display
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"--plot {path}: matplotlib is not installed (pip install matplotlib); no plot written.",
              file=sys.stderr)
        return
    shapes = list(dict.fromkeys(r["shape"] for r in results))
    methods = list(dict.fromkeys(r["method"] for r in results))
    by_key = {(r["shape"], r["method"]): r for r in results}
    fig, axes = plt.subplots(1, 2, figsize=(6 + 1.5 * len(shapes), 4.5))
    width = 0.8 / max(len(methods), 1)
    for ax, key, scale, label in ((axes[0], "time_s", 1.0, "time per step (s)"),
                                  (axes[1], "peak_bytes", 1 / MIB, "peak memory (MiB)")):
        for k, method in enumerate(methods):
            values = [by_key.get((s, method), {}).get(key) for s in shapes]
            xs = [i + (k - (len(methods) - 1) / 2) * width for i in range(len(shapes))]
            ax.bar(xs, [0 if v is None else v * scale for v in values], width, label=method)
        ax.set_xticks(range(len(shapes)), shapes, rotation=20)
        ax.set_ylabel(label)
    for i, s in enumerate(shapes):  # the gradients' floor: the least any method can use
        floor = next(r["floor_bytes"] for r in results if r["shape"] == s) / MIB
        axes[1].hlines(floor, i - 0.45, i + 0.45, colors="black", linestyles="dashed",
                       label="floor" if i == 0 else None)
    axes[1].legend(fontsize="small")
    fig.suptitle(f"{meta['device_name']}, {meta['dtype']}, torch {meta['torch']}", fontsize="medium")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}", file=sys.stderr)
