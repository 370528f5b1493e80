"""``python -m lce_compile.bench.numerics``: the numerics contract (docs/numerics.md), measured.

For every output of the fused cross-entropy (the loss, the per-token ``lse``, the gradients of ``hidden``,
``weight`` and ``bias``) and of the fused token log-probs (log-probs, entropy, and the same three gradients
under a random upstream gradient): the mean relative error against an fp64 unfused reference with full logits,
next to the unfused PyTorch code's own error in the same dtype, in fp32 and bf16, at 1, 8 and 32 chunks. Also:
the dtype each output accumulates in, as the engine does it, and how far each output moves with the chunk count.

    python -m lce_compile.bench.numerics                       # CPU, N=2048 D=256 V=8192 (~15 s on 2 cores)
    python -m lce_compile.bench.numerics --device cuda --json numerics_h200.json   # N=8192 D=4096 V=32768

Error: ``mean|x - gold| / mean|gold|`` in fp64 over the output's elements (``|x - gold| / |gold|`` for the loss),
the form of ``lce_compile.testing.assert_no_less_accurate`` divided by the gold's scale.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import platform

import torch
import torch.nn.functional as F

from .. import engine, policy
from ..losses import AuxRequest, linear_cross_entropy, linear_token_logprobs
from ..policy import FusedOptions
from ..testing import make_inputs
from .run import _cpu_name

# (N tokens, D hidden, V vocab): logit std ~4, 10% of the cross-entropy's targets ignored (testing.make_inputs)
SHAPES = {"cpu": (2048, 256, 8192), "cuda": (8192, 4096, 32768)}
CHUNKS = (1, 8, 32)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
GRADS = ("grad_hidden", "grad_weight", "grad_bias")
# family -> the values its forward returns; the gradients follow
VALUES = {"cross_entropy": ("loss", "lse"), "logprobs": ("logprobs", "entropy")}
SHORT = {torch.float64: "fp64", torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def widen(logits):
    """fp32 for 16-bit logits, fp64 kept: the unfused code's ``.float()``, written apart from the engine's."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def matmul_then_bias(hidden, weight, bias):
    """``hidden @ weight.T + bias`` as the losses' docstrings write it: with 16-bit inputs the logits are rounded
    twice, after the matmul and after the bias (``F.linear``, what ``nn.Linear`` calls, rounds once)."""
    return hidden @ weight.T + bias


def unfused_cross_entropy(hidden, weight, bias, targets, head=F.linear):
    """The unfused code: a model's head, the logits widened, F.cross_entropy's global mean over kept tokens."""
    z = widen(head(hidden, weight, bias))
    return F.cross_entropy(z, targets), z.logsumexp(-1)


def unfused_logprobs(hidden, weight, bias, token_ids, head=F.linear):
    z = widen(head(hidden, weight, bias))
    logp = z.log_softmax(-1)
    return logp.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1)


def fused_cross_entropy(hidden, weight, bias, targets, options=None):
    """The loss and gradients of the plain call, the path training takes (ignored rows are not computed: the
    chunks cover the kept rows only); the per-token lse from a forward with ``return_aux``, which computes every
    row."""
    loss = linear_cross_entropy(hidden, weight, targets, bias=bias, options=options)
    with torch.no_grad():
        _, aux = linear_cross_entropy(hidden, weight, targets, bias=bias, return_aux=AuxRequest(lse=True),
                                      options=options)
    return loss, aux.lse


def fused_logprobs(hidden, weight, bias, token_ids, options=None):
    return linear_token_logprobs(hidden, weight, token_ids, bias=bias, return_entropy=True, options=options)


UNFUSED = {"cross_entropy": unfused_cross_entropy, "logprobs": unfused_logprobs}
UNFUSED_METHODS = {"unfused": F.linear, "unfused_add_bias": matmul_then_bias}
FUSED = {"cross_entropy": fused_cross_entropy, "logprobs": fused_logprobs}


def make_case(n, d, v, device, seed=0):
    """The inputs in fp32 (cast per run): hidden, weight, bias (std 1), the cross-entropy's targets (10% ignored),
    the log-probs' token ids (the same, none ignored) and their fp64 upstream gradients (log-probs, entropy)."""
    hidden, weight, targets = make_inputs(n, d, v, torch.float32, seed)
    g = torch.Generator().manual_seed(seed + 1)
    bias = torch.randn(v, generator=g)
    token_ids = torch.where(targets < 0, torch.randint(0, v, (n,), generator=g), targets)
    upstream = torch.randn(2, n, generator=g, dtype=torch.float64)
    return {k: t.to(device) for k, t in dict(hidden=hidden, weight=weight, bias=bias, targets=targets,
                                              token_ids=token_ids, upstream=upstream).items()}


def run(family, fn, case, dtype):
    """Forward + backward of ``fn`` on fresh leaves in ``dtype`` -> {output name: tensor}. Cross-entropy
    backpropagates its loss; log-probs ``sum(logprobs * u0 + entropy * u1)`` in fp64."""
    h, w, b = (case[k].detach().to(dtype).requires_grad_() for k in ("hidden", "weight", "bias"))
    values = fn(h, w, b, case["targets"] if family == "cross_entropy" else case["token_ids"])
    if family == "cross_entropy":
        objective = values[0]
    else:
        objective = sum((v.double() * u).sum() for v, u in zip(values, case["upstream"]))
    objective.backward()
    return dict(zip(VALUES[family] + GRADS, (*(v.detach() for v in values), h.grad, w.grad, b.grad)))


def relative_error(got, gold) -> float:
    gold = gold.double()
    return ((got.double() - gold).abs().mean() / gold.abs().mean()).item()


def accumulation(device, dtype) -> dict:
    """What each output accumulates in, for inputs of ``dtype`` on ``device``, as the engine does it."""
    weight = torch.empty(1, 1, dtype=dtype, device=device)
    across = SHORT[engine.accumulation_dtype(weight)]
    grad_w = SHORT[policy.grad_weight_dtype(weight, FusedOptions())]
    per_row = "fp32 within its row; no sum across chunks"
    return {"loss": f"{across} sum across chunks", "lse": per_row, "logprobs": per_row, "entropy": per_row,
            "grad_hidden": f"{SHORT[dtype]}, each row by one chunk; no sum across chunks",
            "grad_weight": f"{grad_w} sum across chunks", "grad_bias": f"{across} sum across chunks"}


def measure(shape, device, chunks=CHUNKS, dtypes=DTYPES, compile=None, seed=0, say=print) -> dict:
    """Errors (fused and unfused against fp64), accumulation dtypes and chunk-count differences on one shape.
    ``compile``: ``FusedOptions(compile=...)``, None for the library's choice."""
    n, d, v = shape
    device = torch.device(device)
    case = make_case(n, d, v, device, seed)
    kept = int((case["targets"] >= 0).sum())
    errors, invariance = [], []
    for family in VALUES:
        gold = run(family, UNFUSED[family], case, torch.float64)
        for dname, dtype in dtypes.items():
            say(f"  {family} {dname}")
            for method, head in UNFUSED_METHODS.items():
                ref = run(family, functools.partial(UNFUSED[family], head=head), case, dtype)
                errors += [dict(family=family, output=out, dtype=dname, method=method,
                                error=relative_error(t, gold[out])) for out, t in ref.items()]
                del ref
            # the weight gradient's other accumulator: the weight's dtype (CUDA's default, here simulated on the
            # CPU: each chunk's product computed in fp32, rounded once into the sum) or fp32 (CUDA)
            default_w = policy.grad_weight_dtype(case["weight"].to(dtype), FusedOptions())
            other_w = torch.float32 if default_w == dtype else dtype
            by_chunks = {}
            for k in chunks:
                options = FusedOptions(chunk_size=-(-n // k), compile=compile)
                got = run(family, functools.partial(FUSED[family], options=options), case, dtype)
                errors += [dict(family=family, output=out, dtype=dname, method="fused", chunks=k,
                                error=relative_error(t, gold[out])) for out, t in got.items()]
                by_chunks[k] = got
                if other_w != default_w:
                    options = dataclasses.replace(options, grad_weight_dtype=other_w)
                    grad_w = run(family, functools.partial(FUSED[family], options=options), case, dtype)["grad_weight"]
                    errors.append(dict(family=family, output=f"grad_weight ({SHORT[other_w]} sum)", dtype=dname,
                                       method="fused", chunks=k, accumulates=f"{SHORT[other_w]} sum across chunks",
                                       error=relative_error(grad_w, gold["grad_weight"])))
                    del grad_w
            for out, base in by_chunks[chunks[0]].items():
                for k in chunks[1:]:
                    diff = (by_chunks[k][out].double() - base.double()).abs().max().item()
                    invariance.append(dict(family=family, output=out, dtype=dname, chunks=k, vs=chunks[0],
                                           max_abs_diff=diff, max_abs_value=gold[out].abs().max().item()))
            del by_chunks
        del gold
    return {"errors": errors, "invariance": invariance,
            "accumulation": {dname: accumulation(device, dtype) for dname, dtype in dtypes.items()},
            "chunk_rows": {str(k): -(-n // k) for k in chunks},
            # the chunks those rows make: k, or fewer for a tiny N (48 rows at 2 a chunk: 24); the cross-entropy's
            # loss and gradients chunk its kept rows only
            "chunks_run": {str(k): len(policy.chunk_bounds(n, -(-n // k))) for k in chunks},
            "chunks_run_kept": {str(k): len(policy.chunk_bounds(kept, -(-n // k))) for k in chunks},
            "compiled": policy.wants_compile(device, FusedOptions(compile=compile), n * v)}


def table(data) -> str:
    """The markdown tables: per dtype, each output's error fused at each chunk count beside the unfused code's;
    then how far each output moves with the chunk count."""
    meta, errors = data["meta"], data["errors"]
    chunks = meta["chunks"]
    lines = [f"lce_compile numerics | {meta['device']}: {meta['device_name']} | torch {meta['torch']} | "
             f"N={meta['N']} D={meta['D']} V={meta['V']} | chunk steps compiled: {data['compiled']} | "
             f"{meta['date_utc']}", "",
             "Mean relative error against fp64, mean|x - gold| / mean|gold|. unfused: F.linear (one rounding of the "
             "logits); `@ + bias`: hidden @ weight.T + bias (two). ratio: the worst fused / unfused."]
    for dname in meta["dtypes"]:
        acc = data["accumulation"][dname]
        lines += ["", f"{dname}:", "",
                  "| output | accumulates in | unfused | `@ + bias` | "
                  + " | ".join(f"fused, {k} chunk{'s' * (k > 1)}" for k in chunks) + " | ratio |",
                  "|---" * (5 + len(chunks)) + "|"]
        for family, out in dict.fromkeys((e["family"], e["output"]) for e in errors if e["dtype"] == dname):
            rows = [e for e in errors if (e["family"], e["output"], e["dtype"]) == (family, out, dname)]
            base = out.split(" ")[0]  # "grad_weight (bf16 sum)" sits beside the unfused code's grad_weight
            unfused = {e["method"]: e["error"] for e in errors
                       if (e["family"], e["output"], e["dtype"]) == (family, base, dname) and "chunks" not in e}
            fused = {e["chunks"]: e["error"] for e in rows if e["method"] == "fused"}
            lines.append(f"| {_label(family, out)} | {rows[-1].get('accumulates') or acc[out]} | "
                         + " | ".join(_err(unfused.get(m)) for m in UNFUSED_METHODS) + " | "
                         + " | ".join(_err(fused.get(k)) for k in chunks)
                         + f" | {_ratio(max(fused.values()), unfused.get('unfused'))} |")
    inv = data["invariance"]
    pairs = list(dict.fromkeys((i["dtype"], i["chunks"], i["vs"]) for i in inv))
    lines += ["", "Chunk-count invariance: max |x(k chunks) - x(1 chunk)| over the output's elements.", "",
              "| output | max abs value | " + " | ".join(f"{dt}, {k} vs {vs}" for dt, k, vs in pairs) + " |",
              "|---" * (2 + len(pairs)) + "|"]
    for family, out in dict.fromkeys((i["family"], i["output"]) for i in inv):
        cells = {(i["dtype"], i["chunks"], i["vs"]): i for i in inv if (i["family"], i["output"]) == (family, out)}
        lines.append(f"| {_label(family, out)} | {next(iter(cells.values()))['max_abs_value']:.3g} | "
                     + " | ".join(_err(cells[p]["max_abs_diff"]) if p in cells else "" for p in pairs) + " |")
    return "\n".join(lines)


def _label(family, out):
    return f"{'ce' if family == 'cross_entropy' else family}: {out}"


def _err(value):
    if value is None:
        return ""
    return "0" if value == 0 else f"{value:.2e}"


def _ratio(value, base):
    return "" if not base else f"{value / base:.2f}"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m lce_compile.bench.numerics", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--shape", metavar="N,D,V", help="tokens, hidden, vocab. Default: "
                        + "; ".join(f"{','.join(map(str, s))} on {dev}" for dev, s in SHAPES.items()))
    parser.add_argument("--chunks", default=",".join(map(str, CHUNKS)), metavar="LIST",
                        help="chunk counts, the first the baseline of the invariance table (default: %(default)s)")
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                        help="compile the chunk steps (FusedOptions(compile=...)); auto: the library's choice "
                             "(CUDA; the CPU only with FusedOptions(compile=True))")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="also write the results and metadata here")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    """Measures, prints the tables, writes ``--json``; returns what it writes."""
    args = parse_args(argv)
    shape = SHAPES[args.device] if args.shape is None else parse_shape(args.shape)
    chunks = tuple(int(k) for k in args.chunks.split(","))
    say = (lambda *a: None) if args.quiet else functools.partial(print, flush=True)
    started = datetime.datetime.now(datetime.timezone.utc)
    data = measure(shape, args.device, chunks, compile={"auto": None, "on": True, "off": False}[args.compile],
                   seed=args.seed, say=say)
    data["meta"] = {
        "device": args.device, "device_name": _cpu_name() if args.device == "cpu" else torch.cuda.get_device_name(),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
        "N": shape[0], "D": shape[1], "V": shape[2], "chunks": list(chunks), "dtypes": list(DTYPES),
        "compile": args.compile, "seed": args.seed, "date_utc": started.strftime("%Y-%m-%d %H:%M UTC"),
        "seconds": round((datetime.datetime.now(datetime.timezone.utc) - started).total_seconds(), 1)}
    print(table(data), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(data, f, indent=1)
    return data


def parse_shape(text):
    shape = tuple(int(x) for x in text.replace("x", ",").split(","))
    if len(shape) != 3 or min(shape) < 1:
        raise SystemExit(f"--shape must be three positive integers N,D,V, got {text!r}.")
    return shape


if __name__ == "__main__":
    main()
