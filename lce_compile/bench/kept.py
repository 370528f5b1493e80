"""Rows that carry no loss cost nothing: ``python -m lce_compile.bench.kept [--device cpu|cuda] [--rounds R]
[--fraction F] [--losses ce,kd,grpo,logprobs] [--shapes LIST] [--dtype DT] [--json PATH]``.

The eager fused losses gather the kept rows (targets != ignore_index, tokens inside a mask) before the matmuls,
so a batch with a fraction F of its rows ignored should take ~(1 - F) of the time of the same batch with none
ignored. Per loss, one forward + backward of the same inputs runs with every row kept and with the first F of
every sequence ignored (a prompt; sequences of 1024 tokens as in the GRPO family, or one of N), alternating
in one process round by round (each warmed up twice first); the ratio is taken within each round, and its
median over the rounds is reported with the two median times and the rounds' min/max ratio.

  ce        linear_cross_entropy(ignore_index=-100)
  kd        linear_kd_loss, forward KL to the kd family's teacher, rows ignored through its targets
  grpo      linear_grpo_loss (dapo, token-level ratios), the prompt masked out by completion_mask
  logprobs  (linear_token_logprobs(..., mask=...) * upstream).sum(), a seeded upstream gradient
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time

import torch

from .families import FAMILIES, IGNORE_INDEX
from .families.rl import SEQUENCE
from .measure import make_inputs, step
from .run import DEFAULT_DTYPE, DTYPES, SHAPES, _cpu_name, parse_shapes

LOSSES = ("ce", "kd", "grpo", "logprobs")
DEFAULT_SHAPES = {"cpu": {"ce": "cpu-small", "kd": "kd-cpu", "grpo": "grpo-cpu", "logprobs": "logprobs-cpu"},
                  "cuda": {"ce": "llama3-8b", "kd": "kd-qwen", "grpo": "grpo-qwen", "logprobs": "logprobs-qwen"}}


def _logprobs_fn():
    """The logprobs case: a seeded upstream gradient through the masked log-probs."""
    from lce_compile import linear_token_logprobs

    def logprobs(hidden, weight, targets, token_ids, mask, upstream):
        return (linear_token_logprobs(hidden, weight, token_ids, mask=mask) * upstream).sum()
    return logprobs


def _extras(loss, hidden, weight, targets, token_ids):
    """The loss's other inputs for these targets; token_ids: every row's token (the logprobs case's ids)."""
    if loss != "logprobs":
        return FAMILIES[loss].extras(hidden, weight, targets)  # a GRPO rollout's mask follows the targets
    gen = torch.Generator(device=hidden.device).manual_seed(99)
    upstream = torch.randn(targets.shape, generator=gen, device=hidden.device)
    return {"token_ids": token_ids, "mask": targets != IGNORE_INDEX, "upstream": upstream}


def kept_ratios(loss, shape, fraction, rounds, device, dtype):
    """{"times_none_s": [...], "times_ignored_s": [...], "ratios": [...], "kept_rows": [N, kept]}, one per round."""
    fn = _logprobs_fn() if loss == "logprobs" else FAMILIES[loss].methods["fused"].make()
    n = shape[0]
    hidden, weight, targets = make_inputs(*shape, dtype, torch.device(device))
    hidden.requires_grad_(), weight.requires_grad_()
    # every row kept: make_inputs's ~10% ignored rows get a token too; then the first `fraction` of each sequence out
    full = torch.where(targets == IGNORE_INDEX, torch.arange(n, device=device) % shape[2], targets)
    t = SEQUENCE if n % SEQUENCE == 0 else n
    part = full.clone()
    part.view(-1, t)[:, : round(fraction * t)] = IGNORE_INDEX
    cases = {"none": (full, _extras(loss, hidden, weight, full, full))}
    # the same teacher for both: it does not depend on the targets (and is the largest input)
    cases["ignored"] = (part, cases["none"][1] if loss == "kd" else _extras(loss, hidden, weight, part, full))

    def timed(case):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step(fn, hidden, weight, *cases[case])
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for case in cases:
        timed(case), timed(case)
    times = {case: [] for case in cases}
    for r in range(rounds):
        for case in (("none", "ignored") if r % 2 == 0 else ("ignored", "none")):  # neither always goes first
            times[case].append(timed(case))
    return {"times_none_s": times["none"], "times_ignored_s": times["ignored"],
            "ratios": [p / f for p, f in zip(times["ignored"], times["none"])],
            "kept_rows": [n, int((part != IGNORE_INDEX).sum())]}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m lce_compile.bench.kept", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", choices=DTYPES, help="default: float32 on cpu, bfloat16 on cuda")
    parser.add_argument("--losses", default=",".join(LOSSES), help="comma-separated, of " + ",".join(LOSSES))
    parser.add_argument("--shapes", action="append", metavar="LIST",
                        help="shape names or NxDxV, as the main bench's; every loss runs on each. Default: per "
                             "loss, " + "; ".join(f"{dev}: {', '.join(f'{k} {v}' for k, v in s.items())}"
                                                  for dev, s in DEFAULT_SHAPES.items()))
    parser.add_argument("--fraction", type=float, default=0.5, help="rows ignored (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (default %(default)s)")
    parser.add_argument("--json", default="bench_kept.json", metavar="PATH", help="default: %(default)s")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available in this torch build or machine.")
    if not 0 < args.fraction < 1 or args.rounds < 1:
        parser.error("--fraction must be in (0, 1) and --rounds >= 1.")
    args.losses = [name for name in args.losses.split(",") if name]
    if not args.losses or set(args.losses) - set(LOSSES):
        parser.error(f"--losses: names of {', '.join(LOSSES)}, got {args.losses}.")
    args.dtype = args.dtype or DEFAULT_DTYPE[args.device]
    try:
        args.shapes = parse_shapes(args.shapes) if args.shapes else None
    except ValueError as error:
        parser.error(str(error))
    return args


def main(argv=None):
    args = parse_args(argv)
    meta = {"device": args.device, "dtype": args.dtype, "fraction": args.fraction, "rounds": args.rounds,
            "device_name": torch.cuda.get_device_name() if args.device == "cuda" else _cpu_name(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "argv": sys.argv[1:] if argv is None
            else list(argv), "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    print(f"torch {meta['torch']}, {meta['device_name']}, {args.dtype}, fwd+bwd, {args.rounds} rounds, "
          f"{meta['date_utc']}", flush=True)
    pct = f"{args.fraction:.0%} ignored"
    print(f"\n| loss | shape | kept rows | none ignored | {pct} | ratio (median) | min..max |\n|---|---|---|---|---|---|---|")
    results = []
    for loss in args.losses:
        default = DEFAULT_SHAPES[args.device][loss]
        shapes = args.shapes or [(default, SHAPES[default])]
        for name, shape in shapes:
            found = kept_ratios(loss, shape, args.fraction, args.rounds, args.device, getattr(torch, args.dtype))
            record = {"loss": loss, "shape": name, "N": shape[0], "D": shape[1], "V": shape[2], **found}
            ratios = found["ratios"]
            record.update(ratio=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios),
                          time_none_s=statistics.median(found["times_none_s"]),
                          time_ignored_s=statistics.median(found["times_ignored_s"]))
            print(f"| {loss} | {name} | {found['kept_rows'][1]}/{found['kept_rows'][0]} | "
                  f"{record['time_none_s'] * 1e3:.1f} ms | {record['time_ignored_s'] * 1e3:.1f} ms | "
                  f"{record['ratio']:.2f} | {min(ratios):.2f}..{max(ratios):.2f} |", flush=True)
            results.append(record)
            with open(args.json, "w") as f:  # after each: a stopped run keeps what it measured
                json.dump({"meta": meta, "results": results}, f, indent=1)
    print(f"wrote {args.json}", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
