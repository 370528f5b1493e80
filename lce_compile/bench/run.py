"""``python -m lce_compile.bench``: the command line, the run over (shape, method), and the JSON file."""
from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import platform
import re
import sys

import torch

from . import measure, report, sweep
from .families import FAMILIES

# name -> (N tokens, D hidden, V vocab)
SHAPES = {
    "cpu-small": (2048, 512, 32768),
    "cpu-large": (4096, 1024, 50304),
    "cpu-d256": (2048, 256, 32768),  # the CPU's smallest hidden size: the row math weighs most beside the matmuls
    "gemma2-2b": (8192, 2304, 256000),
    "llama3-8b": (8192, 4096, 128256),
    "qwen2.5-7b": (8192, 3584, 152064),
    "gemma2-2b-32k": (32768, 2304, 256000),
    # --loss kd: the student's (N, D, V); the teacher is TEACHER_WIDTH (families/kd.py) x wider
    "kd-cpu": (1024, 256, 32768),
    "kd-qwen": (8192, 2048, 151936),
    # --loss grpo: N tokens as N / 1024 sequences of 1024 completion tokens
    "grpo-cpu": (2048, 256, 32768),
    "grpo-qwen": (8192, 4096, 151936),
    # --loss dpo: N tokens as 2B sequences of 1024 (B chosen, B rejected); --loss logprobs: N tokens
    "dpo-cpu": (2048, 256, 32768),
    "dpo-qwen": (8192, 4096, 151936),
    "logprobs-cpu": (2048, 256, 32768),
    "logprobs-qwen": (8192, 4096, 151936),
}
DEFAULT_SHAPES = {
    "ce": {"cpu": ["cpu-d256", "cpu-small", "cpu-large"], "cuda": ["gemma2-2b", "llama3-8b", "qwen2.5-7b", "gemma2-2b-32k"]},
    "kd": {"cpu": ["kd-cpu"], "cuda": ["kd-qwen"]},
    "grpo": {"cpu": ["grpo-cpu"], "cuda": ["grpo-qwen"]},
    "dpo": {"cpu": ["dpo-cpu"], "cuda": ["dpo-qwen"]},
    "logprobs": {"cpu": ["logprobs-cpu"], "cuda": ["logprobs-qwen"]},
}
DEFAULT_DTYPE = {"cpu": "float32", "cuda": "bfloat16"}
# Full-size steps before measuring: one eager step of cpu-large takes ~15 s on 2 cores, so the CPU
# warms up on a tiny slice instead (full-size only for methods that compile, see Method.compiles).
DEFAULT_REPEAT = {"cpu": 1, "cuda": 10}
WARMUP = {"cpu": 1, "cuda": 3}
DTYPES = ("float32", "bfloat16", "float16", "float64")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m lce_compile.bench", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Time, peak memory and accuracy of fused linear + loss implementations, per loss family.\n"
                    "Each (shape, method) is measured in fresh worker processes.",
        epilog="shapes (N tokens, D hidden, V vocab):\n"
               + "\n".join(f"  {k:14s}N={n} D={d} V={v}" for k, (n, d, v) in SHAPES.items())
               + "".join(f"\n--loss {name}: {family.doc}\n"
                         + "\n".join(f"  {k:27s}{m.doc}" for k, m in family.methods.items())
                         for name, family in FAMILIES.items()))
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--loss", default="ce", choices=tuple(FAMILIES),
                        help="ce: cross-entropy (default); kd: knowledge distillation (forward KL by default); "
                             "grpo: GRPO (dapo) with a k3 KL term; dpo: DPO (sigmoid); logprobs: token log-probs "
                             "and entropy")
    parser.add_argument("--dtype", choices=DTYPES, help="default: float32 on cpu, bfloat16 on cuda")
    parser.add_argument("--shapes", action="append", metavar="LIST",
                        help="comma-separated shape names and custom shapes, written NxDxV or N,D,V "
                             "(e.g. 'cpu-small,64x32x101' or '64,32,101'); may be repeated. "
                             "Default: cpu-d256,cpu-small,cpu-large on cpu, the four model shapes on cuda")
    parser.add_argument("--methods", metavar="LIST",
                        help="comma-separated method names, or 'all'. Default: "
                             + "; ".join(f"{','.join(parse_methods(None, dev))} on {dev}" for dev in DEFAULT_DTYPE)
                             + " (for --loss ce)"
                             + ". Unavailable ones are skipped with a note")
    parser.add_argument("--tokens", metavar="LIST",
                        help="comma-separated token counts N: run every shape at each of them (the plot then "
                             "shows time and memory against N)")
    parser.add_argument("--repeat", type=int, help="timed steps, median reported. Default: 10 on cuda; on cpu 1, "
                        "and more while the steps so far took < 6 s (at most 9)")
    parser.add_argument("--json", default="bench_results.json", metavar="PATH",
                        help="where to write all results and metadata (default: %(default)s)")
    parser.add_argument("--plot", metavar="PATH.png", help="also plot time and peak memory (needs matplotlib)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines; print only the tables")
    parser.add_argument("--interleaved", type=int, metavar="ROUNDS",
                        help="instead: time the methods side by side in one process, ROUNDS rounds of one step "
                             "each, and print each method's median time ratio to the first method's")
    parser.add_argument("--forward", action="store_true", help="with --interleaved: time the forward pass alone")
    parser.add_argument("--sweep-memory", nargs="?", const="default", metavar="LIST",
                        help="the time-memory curve: measure the fused method at each chunk_memory of LIST "
                             "(comma-separated fractions of the weight's bytes, 'inf' = every token in one chunk; "
                             "default " + ",".join(map(sweep.label, sweep.DEFAULT)) + "), each in its own "
                             "process, beside the peer methods (by default the family's methods that are not "
                             "lce_compile's); budgets that give the same chunks are measured once. --plot then "
                             "draws time against peak memory, one panel per shape")
    parser.add_argument("--inside-compile", action="store_true",
                        help="also measure each lce_compile method (fused*) inside a user's compile: its forward as "
                             "torch.compile(fn, fullgraph=True), backward called eagerly on its result, in the row "
                             "'<method> [in compile]' after the method's own; the table then gives that row's time "
                             "and peak as ratios to the method's eager row (with --interleaved: its time ratio to "
                             "the eager call, round by round). Other methods are measured once, as without it")
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available in this torch build or machine.")
    if args.repeat is not None and args.repeat < 1:
        parser.error(f"--repeat must be >= 1, got {args.repeat}.")
    args.dtype = args.dtype or DEFAULT_DTYPE[args.device]
    args.repeat = args.repeat or DEFAULT_REPEAT[args.device]
    try:
        args.shapes = parse_shapes(args.shapes or DEFAULT_SHAPES[args.loss][args.device])
        if args.tokens:
            args.shapes = with_tokens(args.shapes, args.tokens)
        if args.sweep_memory is not None:
            args.sweep_memory = sweep.parse(args.sweep_memory)
            if args.methods is None:
                args.methods = sweep_methods(args.device, args.loss)
        args.methods = parse_methods(args.methods, args.device, args.loss)
    except ValueError as error:
        parser.error(str(error))
    if args.sweep_memory is not None and args.interleaved:
        parser.error("--sweep-memory measures each point in its own process; it does not combine with --interleaved.")
    if args.sweep_memory is not None and args.inside_compile:
        parser.error("--inside-compile does not combine with --sweep-memory; run them separately.")
    if args.inside_compile and not any(FAMILIES[args.loss].methods[m].lce_compile for m in args.methods):
        parser.error(f"--inside-compile: none of --methods {','.join(args.methods)} is an lce_compile method of "
                     f"--loss {args.loss}; add one, e.g. fused.")
    return args


def sweep_methods(device, loss):
    """--sweep-memory's default methods: the swept one(s) and the peers (not lce_compile's other settings)."""
    methods = FAMILIES[loss].methods
    return ",".join(name for name in parse_methods(None, device, loss)
                    if methods[name].make_at is not None or not methods[name].lce_compile)


def parse_shapes(values):
    """['cpu-small,64x32x101', '64,32,101'] -> [(name, (N, D, V)), ...]; integers group in threes."""
    shapes, numbers = [], []
    for token in filter(None, re.split(r"[,;\s]+", ",".join(values))):
        if token.isdigit():
            numbers.append(int(token))
            if len(numbers) == 3:
                shapes.append(("x".join(map(str, numbers)), tuple(numbers)))
                numbers = []
        elif numbers:
            raise ValueError(f"--shapes: N,D,V needs three integers, got {numbers} before {token!r}.")
        elif re.fullmatch(r"\d+x\d+x\d+", token):
            shapes.append((token, tuple(int(x) for x in token.split("x"))))
        elif token in SHAPES:
            shapes.append((token, SHAPES[token]))
        else:
            raise ValueError(f"--shapes: unknown shape {token!r}; known: {', '.join(SHAPES)}, or NxDxV.")
    if numbers:
        raise ValueError(f"--shapes: N,D,V needs three integers, got {numbers}.")
    if any(min(shape) < 1 for _, shape in shapes):
        raise ValueError("--shapes: N, D and V must be positive.")
    return shapes


def with_tokens(shapes, tokens: str):
    """Each (name, (N, D, V)) at every N of ``tokens`` ('2048,8192'); shapes that differ only in N merge."""
    counts = [int(t) for t in tokens.split(",") if t]
    if not counts or min(counts) < 1:
        raise ValueError(f"--tokens: positive integers, got {tokens!r}.")
    heads = {}  # (D, V) -> the first name given for it
    for name, (_, d, v) in shapes:
        heads.setdefault((d, v), name)
    return [(name, (n, d, v)) for (d, v), name in heads.items() for n in counts]


def parse_methods(value, device, loss="ce"):
    methods = FAMILIES[loss].methods
    if value is None:
        return [name for name, m in methods.items() if device in m.default_on]
    names = list(methods) if value == "all" else [v for v in value.split(",") if v]
    unknown = [n for n in names if n not in methods]
    if unknown:
        raise ValueError(f"--methods: unknown {', '.join(unknown)} for --loss {loss}; known: {', '.join(methods)}.")
    return list(dict.fromkeys(names))


def main(argv=None):
    args = parse_args(argv)
    if args.interleaved:
        from . import interleaved  # imported here: python -m lce_compile.bench.interleaved runs it as __main__
        return interleaved.run(args)
    say = (lambda line: None) if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    meta = _metadata(args)
    methods = []
    for name in args.methods:
        reason = FAMILIES[args.loss].methods[name].unavailable(args.device)
        if reason:
            meta["skipped"][name] = reason
            print(f"skipping {name}: {reason}", file=sys.stderr, flush=True)
        else:
            methods.append(name)
    results = []

    def save(records):  # after every record: a long run that is stopped keeps what it measured
        meta["device_name"] = next((r["device_name"] for r in records if "device_name" in r), meta["device_name"])
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results + records}, f, indent=1)

    for shape_name, shape in args.shapes:
        results += bench_shape(shape_name, shape, methods, args, say, save)
    print(report.tables(meta, results), flush=True)
    if args.sweep_memory is not None:
        found = sweep.reach(results)
        print("\n".join(["", "peer points reached (time <= and peak <= by some chunk_memory of ours):"]
                        + sweep.reach_lines(found)), flush=True)
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results, "reach": found}, f, indent=1)
    print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        (report.plot_sweep if args.sweep_memory is not None else report.plot)(results, args.plot, meta)
    return results


def bench_shape(shape_name, shape, methods, args, say, save=lambda records: None):
    """One record per method: time, peak memory, floor, errors; each measured in fresh processes.
    ``save(records)`` is called with the shape's records so far after each of them."""
    n, d, v = shape
    base = {"device": args.device, "dtype": args.dtype, "shape": shape, "seed": args.seed, "loss": args.loss}
    where = (f"fp64 reference, errors on the first {min(n, measure.ERROR_ROWS)} tokens" if args.device == "cpu"
             else "fp32 reference, errors on all tokens")
    say(f"[{shape_name} N={n}] {where} ...")
    rows = _points(shape, methods, args)
    errors = isolated(dict(base, task="errors", points=[(name, p[0]) for name, p, _ in rows if p is not None],
                           methods=[name for name, p, inside in rows if p is None and not inside],
                           inside_compile=[name for name, _, inside in rows if inside]))
    # Floor: no method can need less than the two gradients it returns.
    floor = (n * d + v * d) * torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    records = []
    for name, point, inside in rows:
        key = measure.point_key(name, None if point is None else point[0], inside)
        record = {"shape": shape_name, "N": n, "D": d, "V": v, "method": name, "floor_bytes": floor}
        task = dict(base, method=name, repeat=args.repeat, warmup=WARMUP[args.device])
        if point is not None:  # a budget of the sweep
            budget, chunks, chunk_rows, same = point
            record.update(chunk_memory=sweep.as_json(budget), chunks=chunks, chunk_rows=chunk_rows,
                          same_chunks_as=[sweep.as_json(b) for b in same])
            task["chunk_memory"] = budget
        if inside:  # its own name; the report divides its time and peak by those of the method's eager row
            record.update(method=key, inside_compile_of=name)
            task["inside_compile"] = True
        parts = [isolated(dict(task, task=args.device))]
        parts.append(errors.get("errors", {}).get(key, {"error": f"errors: {errors.get('error')}"}))
        records.append(_merge(record, parts))
        say(report.progress_line(records[-1]))
        save(records)
    return records


def _points(shape, methods, args):
    """[(method, None | (chunk_memory, chunks, rows, same budgets), inside_compile), ...]: each method once; with
    --sweep-memory, a method that takes a budget once per distinct split of the tokens; with --inside-compile, an
    lce_compile method twice, eagerly and then inside torch.compile."""
    family = FAMILIES[args.loss]
    out = []
    for name in methods:
        if args.sweep_memory is not None and family.methods[name].make_at is not None:
            out += [(name, p, False) for p in sweep.points(shape, args.dtype, family.buffers, args.sweep_memory)]
        else:
            out.append((name, None, False))
            if args.inside_compile and family.methods[name].lce_compile:
                out.append((name, None, True))
    return out


def _merge(record, parts):
    """Fold worker results into one record; errors and warnings from all of them are kept."""
    problems, warnings = [], []
    for part in parts:
        part = dict(part)
        if "error" in part:
            problems.append(part.pop("error"))
        warnings += part.pop("warnings", [])
        record.update(part)
    if problems:
        record["error"] = "; ".join(dict.fromkeys(problems))
    if warnings:
        record["warnings"] = list(dict.fromkeys(warnings))
    return record


_CONTEXT = None


def isolated(task: dict) -> dict:
    """Run ``task`` in a fresh process; a crash (e.g. the OOM killer) becomes ``{"error": ...}``.

    Workers are forked from a forkserver that has imported torch once: a fresh address space per task
    (peak memory is the task's own) without paying the ~3 s torch import for each of them.
    """
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = multiprocessing.get_context("forkserver")
        # Imports only, never a torch op: OpenMP is not fork-safe once its thread pool exists.
        # torch._dynamo: lce_compile imports it at its first call even when nothing compiles (~3 s).
        _CONTEXT.set_forkserver_preload(["lce_compile.bench.measure", "torch._dynamo"])
    recv, send = _CONTEXT.Pipe(duplex=False)
    proc = _CONTEXT.Process(target=measure.child, args=(task, send), daemon=True)
    proc.start()
    send.close()  # so that recv() sees EOF if the worker dies
    try:
        result = recv.recv()
    except EOFError:
        result = None
    proc.join()
    recv.close()
    if result is None:
        hint = ", probably out of memory" if proc.exitcode == -9 else ""
        result = {"error": f"worker died (exit code {proc.exitcode}{hint})"}
    return result


def _metadata(args):
    return {
        "device": args.device, "device_name": _cpu_name() if args.device == "cpu" else "cuda",
        "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
        "lce_compile": _version(), "loss": args.loss, "dtype": args.dtype, "repeat": args.repeat, "warmup": WARMUP[args.device],
        "error_rows": measure.ERROR_ROWS if args.device == "cpu" else "all", "seed": args.seed, "argv": sys.argv[1:], "skipped": {},
        "sweep_memory": None if args.sweep_memory is None else [sweep.as_json(b) for b in args.sweep_memory],
        "inside_compile": args.inside_compile,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _version():
    from lce_compile import __version__
    return __version__


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "cpu"
