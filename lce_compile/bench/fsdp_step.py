"""``python -m lce_compile.bench.fsdp_step``: an FSDP2 training step of a random-initialised transformers model on
``--world`` ranks, unpatched vs ``lce_compile.integrations.transformers.patch``; per rank time and peak memory,
and each method's gradients against one process's unpatched step on the same data.

FSDP2 layout: each decoder layer, the output layer (resharding after forward) and the root. Each rank takes its
own batch; the one-process reference averages the ranks' losses, as FSDP averages their gradients.
Run: ``python -m lce_compile.bench.fsdp_step --device cuda --model llama3.2-1b`` (NCCL; gloo on the CPU).
"""
from __future__ import annotations

import argparse

import torch

from . import ranks

MODELS = {"llama3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                              num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=False),
          "tiny": dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)}


def _model(name, device, dtype):
    import transformers
    config = transformers.LlamaConfig(attn_implementation="sdpa", **MODELS[name])
    torch.manual_seed(0)
    with torch.device(device):
        return transformers.LlamaForCausalLM(config).to(dtype).train()


def _batches(world, batch, tokens, vocab, device):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (world, batch, tokens), generator=g).to(device)
    return ids, ids.clone()


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def _worker(rank, args):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import init_device_mesh
    from ..integrations.transformers import patch
    device, world = args.device, args.world
    dtype = getattr(torch, args.dtype)
    mesh = init_device_mesh(device, (world,))
    ids, labels = _batches(world, args.batch, args.tokens, MODELS[args.model]["vocab_size"], device)
    reference = None
    if rank == 0:  # one process, the ranks' batches, their losses averaged
        model = _model(args.model, device, dtype)
        for r in range(world):
            (model(input_ids=ids[r], labels=labels[r]).loss / world).backward()
        reference = {n: p.grad.float().cpu() for n, p in model.named_parameters()}
        del model
    results = {}
    for method in ("unpatched", "patched"):
        model = _model(args.model, device, dtype)
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model.lm_head, mesh=mesh, reshard_after_forward=True)
        fully_shard(model, mesh=mesh)
        handle = patch(model) if method == "patched" else None
        ms, peak = ranks.timed(lambda: model(input_ids=ids[rank], labels=labels[rank]).loss.backward(),
                               lambda i: model.zero_grad(), args)
        row = {"time_ms": ms}
        if peak is not None:
            row["peak_gib"] = peak / 2 ** 30
        model.zero_grad()
        model(input_ids=ids[rank], labels=labels[rank]).loss.backward()  # one step's gradients, to compare
        grads = {n: p.grad.full_tensor().float().cpu() for n, p in model.named_parameters()}
        if rank == 0:
            errors = [_rel(grads[n], reference[n]) for n in reference]
            row["grad_rel_err_max"], row["grad_rel_err_head"] = max(errors), _rel(grads["lm_head.weight"],
                                                                                 reference["lm_head.weight"])
        results[method] = row
        if handle is not None:
            handle.remove()
        del model, grads
        if device == "cuda":
            torch.cuda.empty_cache()
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m lce_compile.bench.fsdp_step")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--model", default="tiny", choices=tuple(MODELS))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    return ranks.report(args, ranks.spawn(_worker, args), model=args.model, batch=args.batch, tokens=args.tokens)


if __name__ == "__main__":
    main()
