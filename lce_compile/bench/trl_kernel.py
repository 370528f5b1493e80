"""Log-probs + entropy, forward + backward on CUDA: TRL 1.16's chunked kernel vs linear_token_logprobs, side by side.

Run: python -m lce_compile.bench.trl_kernel d4096 qwen0.5b   (TRL installed; writes $OUT/trl_bench.json or ./)
Only TRL's kernel module is imported: the rest of TRL needs accelerate and datasets, which this does not.
"""
import contextlib, json, os, sys, time, types
import torch
# TRL's backward imports maybe_gather_lm_head_ctx from trl.trainer.utils (accelerate, datasets...): a no-op stand-in
stub = types.ModuleType("trl.trainer.utils"); stub.maybe_gather_lm_head_ctx = lambda w, b: contextlib.nullcontext()
sys.modules["trl.trainer"] = types.ModuleType("trl.trainer"); sys.modules["trl.trainer.utils"] = stub
from trl.kernels.chunked_logprob import ChunkedLogProbFunction
from lce_compile import AuxRequest, FusedOptions, linear_token_logprobs

SHAPES = {"d4096": (16384, 4096, 151936), "qwen0.5b": (16384, 896, 151936)}
MIB = 1 << 20


def trl(h, w, t):
    lp, ent, *_ = ChunkedLogProbFunction.apply(h, w, None, t, 1.0, 32768, None, 1.0, ("entropy",))
    return lp, ent


def ours(options):
    def fn(h, w, t):
        lp, aux = linear_token_logprobs(h, w, t, return_aux=AuxRequest(entropy=True), options=options)
        return lp, aux.entropy
    return fn


def unfused(h, w, t):
    logp = (h @ w.T).float().log_softmax(-1)
    return logp.gather(-1, t[:, None])[:, 0], -(logp.exp() * logp).sum(-1)


METHODS = {"trl": trl, "fused": ours(None), "fused_fp32_grad_weight": ours(FusedOptions(grad_weight_dtype=torch.float32)),
           "fused_lean": ours(FusedOptions(chunk_memory=0.1)), "compile": torch.compile(unfused)}


def step(fn, h, w, t, ups):
    h.grad = w.grad = None
    lp, ent = fn(h, w, t)
    ((lp * ups[0]).sum() + (ent * ups[1]).sum()).backward()
    return lp.detach(), ent.detach(), h.grad, w.grad


def main(shape, rounds=5):
    n, d, v = SHAPES[shape]
    g = torch.Generator(device="cuda").manual_seed(0)
    h = (torch.randn(n, d, device="cuda", generator=g)).bfloat16().requires_grad_()
    w = (torch.randn(v, d, device="cuda", generator=g) * (2 / d ** 0.5)).bfloat16().requires_grad_()
    t = torch.randint(0, v, (n,), device="cuda", generator=g)
    ups = torch.randn(n, device="cuda", generator=g), torch.randn(n, device="cuda", generator=g) * 0.1
    floor = (h.numel() + w.numel()) * 2
    # fp32 reference in chunks of rows (errors only)
    gold = [torch.zeros(n, device="cuda"), torch.zeros(n, device="cuda"), torch.zeros(n, d, device="cuda"), torch.zeros(v, d, device="cuda")]
    w32 = w.detach().float().requires_grad_()
    for s in range(0, n, 2048):
        h32 = h.detach()[s:s + 2048].float().requires_grad_()
        lp, ent = unfused(h32, w32, t[s:s + 2048])
        ((lp * ups[0][s:s + 2048]).sum() + (ent * ups[1][s:s + 2048]).sum()).backward()
        gold[0][s:s + 2048], gold[1][s:s + 2048], gold[2][s:s + 2048] = lp.detach(), ent.detach(), h32.grad
    gold[3] = w32.grad
    del w32
    res = {}
    for name, fn in METHODS.items():
        try:
            out = step(fn, h, w, t, ups); torch.cuda.synchronize()   # warm-up / compile
            err = [((o.float() - g).abs().mean() / g.abs().mean()).item() for o, g in zip(out, gold)]
            del out; h.grad = w.grad = None; torch.cuda.synchronize(); torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated(); torch.cuda.reset_peak_memory_stats()
            step(fn, h, w, t, ups); torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
            res[name] = {"times": [], "peak_mib": peak / MIB, "x_floor": peak / floor, "rel_err": err}
        except Exception as e:
            res[name] = {"error": f"{type(e).__name__}: {e}"[:200]}
    for _ in range(rounds):  # interleaved rounds: each method once per round
        for name, fn in METHODS.items():
            if "error" in res[name]: continue
            torch.cuda.synchronize(); t0 = time.perf_counter()
            for _ in range(3): step(fn, h, w, t, ups)
            torch.cuda.synchronize(); res[name]["times"].append((time.perf_counter() - t0) / 3 * 1e3)
    base_ms = sorted(res["trl"]["times"])[rounds // 2]
    for name, r in res.items():
        if "times" in r:
            r["ms"] = sorted(r["times"])[rounds // 2]; r["x_trl"] = r["ms"] / base_ms
        print(f"{shape} {name:>24}: " + (r.get("error") or f"{r['ms']:.1f} ms ({r['x_trl']:.2f}x TRL), peak {r['peak_mib']:.0f} MiB = {r['x_floor']:.2f}x floor, rel err lp/ent/gh/gw " + " ".join(f"{e:.2e}" for e in r['rel_err'])), flush=True)
    return {"shape": [n, d, v], "floor_mib": floor / MIB, "results": res}


if __name__ == "__main__":
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "shapes": {s: main(s) for s in sys.argv[1:]}}
    json.dump(out, open(os.path.join(os.environ.get("OUT", "."), "trl_bench.json"), "w"), indent=1)
