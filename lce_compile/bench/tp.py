"""``python -m lce_compile.bench.tp``: vocabulary-parallel cross-entropy on a tensor-parallel mesh, per rank.

Spawns ``--world`` processes (NCCL on CUDA, gloo on the CPU). Each holds ``V / world`` rows of the head as a
``Shard(0)`` DTensor and the same tokens; methods, side by side in each process:

* ``loss_parallel``: ``F.cross_entropy`` on ``Shard(-1)`` DTensor logits under ``loss_parallel()`` (eager)
* ``gather``: all-gather the logits (transformers' ``colwise_gather_output``), then cross-entropy
* ``fused``: ``linear_cross_entropy`` on the DTensors

Time: median forward + backward; peak: memory above the inputs on rank 0; floor: ``grad_hidden`` plus the
local ``grad_weight``. Errors: relative norms against an fp64 single-process reference on the first tokens.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from . import ranks

METHODS = ("loss_parallel", "gather", "fused")


def _step(method, hidden, weight, targets):
    """One forward + backward on DTensors hidden (Replicate) and weight (Shard(0)); returns the loss."""
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor.parallel import loss_parallel
    from .. import linear_cross_entropy
    if method == "fused":
        loss = linear_cross_entropy(hidden, weight, targets)
        loss.backward()
        return loss.to_local()
    from torch.distributed.tensor import Partial, Replicate
    mesh, w = weight.device_mesh, weight.to_local()
    h = hidden.to_local(grad_placements=[Partial()])  # the ranks' partial gradients summed by DTensor
    n, v = h.shape[0], weight.shape[0]
    logits = DTensor.from_local(h @ w.T, mesh, [Shard(-1)], shape=(n, v), stride=(v, 1))
    if method == "loss_parallel":
        with loss_parallel():
            loss = F.cross_entropy(logits.float(), targets)
            loss.backward()
        return loss.to_local()
    full = logits.redistribute(mesh, [Replicate()]).to_local()
    loss = F.cross_entropy(full.float(), targets.to_local() if isinstance(targets, DTensor) else targets)
    loss.backward()
    return loss


def _inputs(n, d, v, dtype, device, mesh, seed=0):
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
    g = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(n, d, generator=g).to(device, dtype)
    weight = (torch.randn(v, d, generator=g) * (4 / d ** 0.5)).to(device, dtype)
    targets = torch.randint(0, v, (n,), generator=g).to(device)
    targets[::10] = -100
    h_local = hidden.clone().requires_grad_()
    h_dt = DTensor.from_local(h_local, mesh, [Replicate()])
    w_dt = distribute_tensor(weight, mesh, [Shard(0)]).detach().requires_grad_()
    return hidden, weight, targets, h_local, h_dt, w_dt


def _errors(method, n, d, v, dtype, device, mesh, rows=512):
    """Relative errors of loss, grad_hidden, local grad_weight on the first ``rows`` tokens vs fp64."""
    hidden, weight, targets, h_local, h_dt, w_dt = _inputs(min(n, rows), d, v, dtype, device, mesh)
    loss = _step(method, h_dt, w_dt, targets)
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    gold = F.cross_entropy(h64 @ w64.T, targets)
    gold.backward()
    local = w_dt.to_local().shape[0]
    step = -(-v // mesh.size())
    start = mesh.get_local_rank() * step
    def rel(a, b):
        return ((a.double() - b).norm() / b.norm()).item()
    return {"err_loss": rel(loss, gold), "err_grad_h": rel(h_local.grad, h64.grad),
            "err_grad_w": rel(w_dt.grad.to_local(), w64.grad[start:start + local])}


def _worker(rank, args):
    from torch.distributed.tensor import init_device_mesh
    device = args.device
    mesh = init_device_mesh(device, (args.world,))
    dtype = getattr(torch, args.dtype)
    n, d, v = args.shape
    results = {}
    for method in args.methods:
        try:
            hidden, weight, targets, h_local, h_dt, w_dt = _inputs(n, d, v, dtype, device, mesh)
            del hidden, weight

            def reset(i):
                h_local.grad = w_dt.grad = None

            ms, peak = ranks.timed(lambda: _step(method, h_dt, w_dt, targets), reset, args)
            floor = h_local.numel() * h_local.element_size() + w_dt.to_local().numel() * w_dt.element_size()
            row = {"time_ms": ms, "floor_mib": floor / 2 ** 20}
            if peak is not None:
                row["peak_mib"] = peak / 2 ** 20
                row["x_floor"] = row["peak_mib"] / row["floor_mib"]
            del h_local, h_dt, w_dt, targets
            row.update(_errors(method, n, d, v, dtype, device, mesh))
        except Exception as error:  # a method that fails on this stack is reported, not fatal
            row = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
        results[method] = row
        if device == "cuda":
            torch.cuda.empty_cache()
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m lce_compile.bench.tp", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--shape", default="8192,4096,128256", help="N,D,V (default: Llama-3-8B's head)")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    args.shape = tuple(int(x) for x in args.shape.replace("x", ",").split(","))
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    args.methods = args.methods.split(",")
    return ranks.report(args, ranks.spawn(_worker, args), shape=args.shape)


if __name__ == "__main__":
    main()
