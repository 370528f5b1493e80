"""Side-by-side time ratios: ``python -m lce_compile.bench.interleaved``.

Each timed round runs one step of the baseline then one of every other method, in one process, and the
ratio of the two is taken within the round: drift of a shared machine (±15% between runs on 2 cores) moves
both sides of a ratio alike. The median ratio over rounds is reported. Memory is the main benchmark's job.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from .measure import make_inputs, step
from .methods import METHODS
from .run import parse_shapes


def ratios(shape, methods, rounds, device="cpu", dtype=torch.float32):
    """{method: [time / baseline time, one per round]}; methods[0] is the baseline."""
    hidden, weight, targets = make_inputs(*shape, dtype, torch.device(device))
    hidden.requires_grad_(), weight.requires_grad_()
    fns = {name: METHODS[name].make() for name in methods}

    def timed(fn):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step(fn, hidden, weight, targets)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for fn in fns.values():  # full-size warm-up: compilation stays out of the rounds
        timed(fn)
    out = {name: [] for name in methods[1:]}
    for _ in range(rounds):
        base = timed(fns[methods[0]])
        for name in methods[1:]:
            out[name].append(timed(fns[name]) / base)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m lce_compile.bench.interleaved", description=__doc__)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--shapes", action="append", default=None, help="as in python -m lce_compile.bench")
    parser.add_argument("--methods", default="eager,fused", help="comma list; the first is the baseline")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    methods = args.methods.split(",")
    print(f"torch {torch.__version__}, {args.device}, fp32, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    for name, shape in parse_shapes(args.shapes or ["cpu-small,cpu-large"]):
        for method, values in ratios(shape, methods, args.rounds, args.device).items():
            print(f"{name}: {method} / {methods[0]} = {statistics.median(values):.2f} (median of "
                  f"{len(values)} rounds: {', '.join(f'{v:.2f}' for v in values)})", flush=True)


if __name__ == "__main__":
    main()
