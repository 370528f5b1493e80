"""Side-by-side time ratios: ``python -m lce_compile.bench --interleaved ROUNDS`` (or, as before,
``python -m lce_compile.bench.interleaved``).

Each timed round runs one step of the baseline then one of every other method, in one process, and the
ratio of the two is taken within the round: drift of a shared machine (±15% between runs on 2 cores) moves
both sides of a ratio alike. The median ratio over rounds is reported. Memory is the main benchmark's job.
With ``--inside-compile``, an lce_compile method's call inside ``torch.compile`` runs right after its eager call
and is divided by that call's time instead.
"""
from __future__ import annotations

import statistics
import sys
import time

import torch

from .measure import IN_COMPILE, _make, make_inputs, step
from .families import FAMILIES


def ratios(shape, methods, rounds, device="cpu", dtype=torch.float32, forward=False, loss="ce",
           inside_compile=False):
    """{method: [time / baseline time, one per round]}; methods[0] is the baseline.

    forward: time the forward pass alone, under ``torch.no_grad()``, instead of forward + backward.
    inside_compile: also ``"<method> [in compile]"`` for each lce_compile method, as a ratio to the method's time
    in the same round.
    """
    family = FAMILIES[loss]
    hidden, weight, targets = make_inputs(*shape, dtype, torch.device(device))
    hidden.requires_grad_(), weight.requires_grad_()
    extras = family.extras(hidden, weight, targets)  # once: the same teacher or rollout for every method
    fns, divisor = {}, {}  # divisor: name -> the method whose time in the round it is divided by
    for name in methods:
        fns[name], divisor[name] = family.methods[name].make(), methods[0]
        if inside_compile and family.methods[name].lce_compile:
            fns[name + IN_COMPILE] = _make(family.methods[name], inside_compile=True)
            divisor[name + IN_COMPILE] = name

    def timed(fn):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        if forward:
            with torch.no_grad():
                fn(hidden, weight, targets, **extras)
        else:
            step(fn, hidden, weight, targets, extras)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for fn in fns.values():  # full-size warm-up: compilation stays out of the rounds
        timed(fn)
        timed(fn)
    out = {name: [] for name in fns if name != methods[0]}
    for _ in range(rounds):
        times = {name: timed(fn) for name, fn in fns.items()}
        for name in out:
            out[name].append(times[name] / times[divisor[name]])
    return out


def run(args) -> dict:
    """``python -m lce_compile.bench --interleaved ROUNDS`` (args from its parser): print and return the ratios."""
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    print(f"torch {torch.__version__}, {device_name}, {args.dtype}, {'forward only' if args.forward else 'fwd+bwd'}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    out = {}
    for name, shape in args.shapes:
        found = ratios(shape, args.methods, args.interleaved, args.device, getattr(torch, args.dtype), args.forward,
                       args.loss, args.inside_compile)
        out[name] = found
        for method, values in found.items():
            over = method.removesuffix(IN_COMPILE) if method.endswith(IN_COMPILE) else args.methods[0]
            print(f"{name}: {method} / {over} = {statistics.median(values):.2f} (median of "
                  f"{len(values)} rounds: {', '.join(f'{v:.2f}' for v in values)})", flush=True)
    return out


def main(argv=None):
    """The old spelling: ``python -m lce_compile.bench.interleaved [--rounds R] ...`` runs
    ``python -m lce_compile.bench --interleaved R ...`` (default methods eager,fused; shapes as the bench's)."""
    from .run import parse_args
    argv = list(sys.argv[1:] if argv is None else argv)
    rounds = "5"
    if "--rounds" in argv:
        i = argv.index("--rounds")
        rounds = argv[i + 1]
        del argv[i:i + 2]
    if "--methods" not in argv:
        argv += ["--methods", "eager,fused"]
    args = parse_args(argv + ["--interleaved", rounds])
    return run(args)


if __name__ == "__main__":
    main()
