"""Progress lines, result tables and the optional plot."""
from __future__ import annotations

import sys

MIB = 1 << 20
COLUMNS = ("method", "time", "x {base}", "peak MiB", "x floor", "err loss", "err grad_h", "err grad_w")
# CUDA runs also time the forward pass alone (no_grad) and the first call (compilation included)
FORWARD_COLUMNS = ("fwd", "fwd x {base}", "fwd MiB", "1st call")
# --inside-compile: a "<method> [in compile]" row's time and peak over those of the method's eager row
INSIDE_COMPILE_COLUMNS = ("time x call", "peak x call")
INSIDE_COMPILE_NOTE = ("[in compile]: the method's forward inside torch.compile(fn, fullgraph=True), backward eager on "
                       "its result,\n  as a user's compiled step calls it; time/peak x call: over the method's eager "
                       "row (target <= 1.05)")


def name(r: dict) -> str:
    """A record's row label: the method, and for a point of --sweep-memory its budget and chunks."""
    if "chunk_memory" not in r:
        return r["method"]
    return f"{r['method']} @{r['chunk_memory']} ({r['chunks']}x{r['chunk_rows']})"


def progress_line(r: dict) -> str:
    line = (f"[{r['shape']} N={r['N']}] {name(r)}: {_time(r.get('time_s'))}, peak {_mib(r.get('peak_bytes'))} MiB "
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
    for shape, n in dict.fromkeys((r["shape"], r["N"]) for r in results):
        out += [""] + _shape_table([r for r in results if r["shape"] == shape and r["N"] == n])
    return "\n".join(out)


def _shape_table(rows: list) -> list:
    first = rows[0]
    base = _baseline(rows)
    lines = [f"{first['shape']}: N={first['N']} D={first['D']} V={first['V']}, "
             f"floor (grad_hidden + grad_weight) {_mib(first['floor_bytes'])} MiB"]
    forward = any("forward_time_s" in r for r in rows)
    eager_rows = {r["method"]: r for r in rows if "inside_compile_of" not in r}
    inside = [r for r in rows if "inside_compile_of" in r]
    columns = COLUMNS + (INSIDE_COMPILE_COLUMNS if inside else ()) + (FORWARD_COLUMNS if forward else ())
    cells = [[c.format(base=base["method"] if base else "eager") for c in columns]]
    for r in rows:
        cells.append([name(r), _time(r.get("time_s")), _ratio(r.get("time_s"), base and base.get("time_s")),
                      _mib(r.get("peak_bytes")), _ratio(r.get("peak_bytes"), r["floor_bytes"]),
                      _err(r.get("err_loss")), _err(r.get("err_grad_hidden")), _err(r.get("err_grad_weight"))])
        if inside:
            call = eager_rows.get(r.get("inside_compile_of"))  # None on the other rows: blank cells
            cells[-1] += ["", ""] if call is None else [_ratio(r.get(k), call.get(k)) for k in ("time_s", "peak_bytes")]
        if forward:
            cells[-1] += [_time(r.get("forward_time_s")),
                          _ratio(r.get("forward_time_s"), base and base.get("forward_time_s")),
                          _mib(r.get("forward_peak_bytes")), _time(r.get("first_call_s"))]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    for row in cells:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(row, widths))).rstrip())  # blank last cells
    if inside:
        lines.append(f"  {INSIDE_COMPILE_NOTE}")
    for r in rows:
        if "error" in r:
            lines.append(f"  {name(r)}: ERROR {r['error']}")
        for warning in r.get("warnings", []):
            lines.append(f"  {name(r)}: warning: {warning}")
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


def _pyplot(path):
    """matplotlib.pyplot, imported here (an optional dependency), or None with a note."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only; never needs a display
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"--plot {path}: matplotlib is not installed (pip install matplotlib); no plot written.",
              file=sys.stderr)
        return None
    return plt


def plot(results: list, path: str, meta: dict) -> None:
    """Time and peak memory against the number of tokens: one column of panels per head (D, V), one line
    per method, and the gradients' floor dashed. A head run at a single N shows single points."""
    plt = _pyplot(path)
    if plt is None:
        return
    names = {}  # (D, V) -> the first shape name: shapes that differ only in N share a column
    for r in results:
        names.setdefault((r["D"], r["V"]), r["shape"])
    heads = [(name, d, v) for (d, v), name in names.items()]
    methods = list(dict.fromkeys(r["method"] for r in results))
    fig, axes = plt.subplots(2, len(heads), figsize=(1 + 4.2 * len(heads), 7.5), squeeze=False)
    for col, (shape, d, v) in enumerate(heads):
        rows = sorted((r for r in results if (r["D"], r["V"]) == (d, v)), key=lambda r: r["N"])
        for ax, key, scale, label in ((axes[0][col], "time_s", 1e3, "fwd+bwd time (ms)"),
                                      (axes[1][col], "peak_bytes", 1 / MIB, "peak memory above inputs (MiB)")):
            for method in methods:
                points = [(r["N"], r[key] * scale) for r in rows if r["method"] == method and r.get(key)]
                if points:
                    ax.plot(*zip(*points), marker="o", label=method)
            ax.set_ylabel(label)
            ax.set_xlabel("tokens N")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
        floors = sorted({(r["N"], r["floor_bytes"] / MIB) for r in rows})
        axes[1][col].plot(*zip(*floors), "k--", label="floor (gradients)")
        axes[0][col].set_title(f"{shape}: D={d}, V={v}", fontsize="medium")
    axes[1][0].legend(fontsize="small")
    fig.suptitle(f"{meta['device_name']}, {meta['dtype']}, torch {meta['torch']}, {meta['date_utc']}",
                 fontsize="medium")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}", file=sys.stderr)


_MARKERS = "sD^vP*Xhp<>"
_PEERS = ("eager", "compile", "liger", "cce", "trl", "torch_lce")


def plot_sweep(results: list, path: str, meta: dict) -> None:
    """--sweep-memory: time against peak memory (x floor), one panel per shape; each swept method's budgets as a
    line (labelled with their chunk_memory), every other method as a marker."""
    plt = _pyplot(path)
    if plt is None:
        return
    from matplotlib import ticker
    shapes = list(dict.fromkeys((r["shape"], r["N"]) for r in results))
    cols = min(len(shapes), 2)
    rows_ = -(-len(shapes) // cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(0.5 + 6 * cols, 0.5 + 4.6 * rows_), squeeze=False)
    for ax, (shape, n) in zip(axes.flat, shapes):
        rows = [r for r in results if (r["shape"], r["N"]) == (shape, n) and r.get("time_s")
                and r.get("peak_bytes") is not None]
        first = next((r for r in results if (r["shape"], r["N"]) == (shape, n)))
        for method in dict.fromkeys(r["method"] for r in rows if "chunk_memory" in r):
            curve = sorted((r for r in rows if r["method"] == method and "chunk_memory" in r),
                           key=lambda r: r["peak_bytes"])
            xs = [r["peak_bytes"] / r["floor_bytes"] for r in curve]
            ys = [r["time_s"] * 1e3 for r in curve]
            ax.plot(xs, ys, "-o", color="C0", label=f"{method} (chunk_memory)", zorder=3)
            for x, y, r in zip(xs, ys, curve):
                ax.annotate(str(r["chunk_memory"]), (x, y), textcoords="offset points", xytext=(4, 4),
                            fontsize="x-small", color="C0")
        peers = [r for r in rows if "chunk_memory" not in r]
        for i, r in enumerate(peers):
            # the same marker and colour for a method in every panel and figure
            k = _PEERS.index(r["method"]) if r["method"] in _PEERS else len(_PEERS) + i
            ax.plot(r["peak_bytes"] / r["floor_bytes"], r["time_s"] * 1e3, _MARKERS[k % len(_MARKERS)],
                    color=f"C{k % 9 + 1}", markersize=8, label=r["method"], zorder=4)
        ax.axvline(1.5, color="grey", linestyle=":", linewidth=1)  # the default's bound
        ax.set_xscale("log")
        ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis):  # 40, 60, 1.5 rather than 4 x 10^1
            axis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
            axis.set_minor_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
        ax.tick_params(which="minor", labelsize="x-small")
        ax.set_xlabel("peak memory above the inputs, x floor (the gradients)")
        ax.set_ylabel("fwd+bwd time (ms)")
        ax.set_title(f"{shape}: N={n}, D={first['D']}, V={first['V']}", fontsize="medium")
        ax.legend(fontsize="x-small")
        ax.grid(True, which="both", alpha=0.25)
    for ax in list(axes.flat)[len(shapes):]:
        ax.set_visible(False)
    fig.suptitle(f"{meta['loss']}: {meta['device_name']}, {meta['dtype']}, torch {meta['torch']}, "
                 f"{meta['date_utc']}", fontsize="medium")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}", file=sys.stderr)
