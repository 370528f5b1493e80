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
from .methods import LOSSES
from .run import parse_shapes


def ratios(shape, methods, rounds, device="cpu", dtype=torch.float32, forward=False, loss="ce"):
    """{method: [time / baseline time, one per round]}; methods[0] is the baseline.

    forward: time the forward pass alone, under ``torch.no_grad()``, instead of forward + backward.
    """
    hidden, weight, targets = make_inputs(*shape, dtype, torch.device(device))
    hidden.requires_grad_(), weight.requires_grad_()
    fns = {name: LOSSES[loss][name].make() for name in methods}

    def timed(fn):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        if forward:
            with torch.no_grad():
                fn(hidden, weight, targets)
        else:
            step(fn, hidden, weight, targets)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for fn in fns.values():  # full-size warm-up: compilation stays out of the rounds
        timed(fn)
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
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--forward", action="store_true", help="time the forward pass alone (no_grad)")
    parser.add_argument("--loss", default="ce", choices=tuple(LOSSES), help="as in python -m lce_compile.bench")
    args = parser.parse_args(argv)
    methods = args.methods.split(",")
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    print(f"torch {torch.__version__}, {device_name}, {args.dtype}, {'forward only' if args.forward else 'fwd+bwd'}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    for name, shape in parse_shapes(args.shapes or ["cpu-small,cpu-large"]):
        found = ratios(shape, methods, args.rounds, args.device, getattr(torch, args.dtype), args.forward, args.loss)
        for method, values in found.items():
            print(f"{name}: {method} / {methods[0]} = {statistics.median(values):.2f} (median of "
                  f"{len(values)} rounds: {', '.join(f'{v:.2f}' for v in values)})", flush=True)


if __name__ == "__main__":
    main()
