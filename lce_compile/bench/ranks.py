"""Multi-process benchmarks: one process per rank (NCCL on CUDA, gloo on the CPU), rank 0's results as JSON."""
from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist


def spawn(worker, args) -> dict:
    """Run ``worker(rank, args)`` on ``args.world`` processes; returns what rank 0 passed to ``finish``."""
    with tempfile.TemporaryDirectory() as tmp:
        args.rendezvous, args.results = os.path.join(tmp, "rdzv"), os.path.join(tmp, "out.json")
        torch.multiprocessing.spawn(_run, args=(worker, args), nprocs=args.world)
        with open(args.results) as f:
            return json.load(f)


def _run(rank, worker, args):
    if args.device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo", init_method=f"file://{args.rendezvous}",
                            rank=rank, world_size=args.world)
    try:
        results = worker(rank, args)
        if rank == 0:
            with open(args.results, "w") as f:
                json.dump(results, f)
        dist.barrier()  # every rank done before any tears the group down
    finally:
        dist.destroy_process_group()
    # Done and written: leave without the interpreter's teardown, where a gloo rank was seen to abort now and then
    # ("terminate called without an active exception") after its work was done.
    sys.stdout.flush()
    os._exit(0)


def report(args, results, **meta) -> dict:
    """The run's JSON: machine, torch, date, the given fields and the results; printed, and written to --json."""
    out = {"device": args.device, "world": args.world, **meta, "dtype": args.dtype, "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "results": results}
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


def timed(step, reset, args):
    """``step()`` timed on every rank at once: (median ms of ``args.repeat`` steps after ``args.warmup``, peak bytes
    above the memory at the first timed step on CUDA, else None). ``reset(i)`` runs before step i, untimed."""
    cuda = args.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    times, base = [], None
    for i in range(args.warmup + args.repeat):
        reset(i)
        if cuda and i == args.warmup:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        sync()
        dist.barrier()
        start = time.perf_counter()
        step()
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    peak = None if base is None else torch.cuda.max_memory_allocated() - base
    return 1e3 * statistics.median(times), peak
