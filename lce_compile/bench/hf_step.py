"""One transformers training step (forward + backward, random-initialised real-size config): unpatched vs
lce_compile's patch vs Liger's instance patch; time, peak above the weights, the largest batch. With --compile,
each method's model is built and patched first, then run as ``torch.compile(model)`` (default mode, graph breaks
allowed), measured the same way: the warm-up steps compile.

Run: python -m lce_compile.bench.hf_step llama3.2-1b unpatched,lce_compile,liger [--compile]
         CUDA, bf16; writes $OUT/hf_<shape>.json, or hf_<shape>_compiled.json with --compile
     python -m lce_compile.bench.hf_step tiny-llama unpatched,lce_compile --device cpu [--compile]
         CPU, fp32, time and loss only (no memory, no largest batch): checks the script and the losses
"""
import argparse, gc, json, os, time
import torch, transformers
from lce_compile.integrations.transformers import patch

SHAPES = {
    "llama3.2-1b": dict(cls="LlamaConfig", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                        num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                        tie_word_embeddings=True, max_position_embeddings=4096, rope_theta=500000.0),
    "gemma2-2b": dict(cls="Gemma2Config", vocab_size=256000, hidden_size=2304, intermediate_size=9216,
                      num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                      final_logit_softcapping=30.0, attn_logit_softcapping=50.0, query_pre_attn_scalar=256,
                      sliding_window=4096, tie_word_embeddings=True, max_position_embeddings=8192),
    "tiny-llama": dict(cls="LlamaConfig", vocab_size=1024, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=128, seq=64),
}
METHODS = ("unpatched", "lce_compile", "liger")
T, GIB = 2048, 1 << 30  # T: tokens per row, unless the shape gives its own seq
BUDGET = 135 * GIB  # "the same memory": what each method may use on the 139 GiB H200, weights included
DTYPES = {"cuda": torch.bfloat16, "cpu": torch.float32}  # fp32 on the CPU: its losses are compared closely


def build(name, device):
    kw = dict(SHAPES[name]); cls = getattr(transformers, kw.pop("cls")); kw.pop("seq", None)
    cfg = cls(attn_implementation="sdpa", **kw)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=DTYPES[device.type])
    return model.train()


def batch(b, seq, vocab, device):
    g = torch.Generator(device=device).manual_seed(b)
    ids = torch.randint(0, vocab, (b, seq), device=device, generator=g)
    return ids, ids.clone()


def step(model, ids, labels):
    out = model(input_ids=ids, labels=labels)
    # logits (b, 0, V) when the fused loss ran (the patch's placeholder), else (b, seq, V); not held through the
    # backward, as the peak would count them
    loss, logits_shape = out.loss, list(out.logits.shape)
    del out
    loss.backward()
    return loss.detach(), logits_shape


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(model, b, seq, vocab, device, reps=5):
    cuda = device.type == "cuda"
    ids, labels = batch(b, seq, vocab, device)
    for p in model.parameters(): p.grad = None
    gc.collect()
    if cuda:
        torch.cuda.empty_cache(); torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    step(model, ids, labels); sync(device)  # warm-up (compiles), grads allocated
    step(model, ids, labels); sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        loss, logits_shape = step(model, ids, labels)
    sync(device)
    ms = (time.perf_counter() - t0) / reps * 1e3
    for p in model.parameters(): p.grad = None
    result = {"ms": ms, "loss": loss.item(), "logits_shape": logits_shape}
    if cuda:
        peak = torch.cuda.max_memory_allocated()
        result.update(peak_above_weights_gib=(peak - base) / GIB, weights_gib=base / GIB)
    return result


def fits(model, b, seq, vocab, device):
    try:
        ids, labels = batch(b, seq, vocab, device)
        step(model, ids, labels); torch.cuda.synchronize()
        ok = torch.cuda.max_memory_allocated() <= BUDGET
    except torch.OutOfMemoryError:
        ok = False
    for p in model.parameters(): p.grad = None
    gc.collect(); torch.cuda.empty_cache()
    return ok


def largest_batch(model, r4, r8, seq, vocab, device):
    per_b = (r8["peak_above_weights_gib"] - r4["peak_above_weights_gib"]) / 4
    fixed = r4["weights_gib"] + r4["peak_above_weights_gib"] - 4 * per_b
    b = int((BUDGET / GIB - fixed) / per_b)
    torch.cuda.reset_peak_memory_stats()
    for _ in range(5):
        if fits(model, b, seq, vocab, device):
            return b
        b -= max(1, b // 20)
        torch.cuda.reset_peak_memory_stats()
    return None


def run(name, methods, device="cuda", compiled=False):
    device = torch.device(device)
    model = build(name, device); vocab, seq = model.config.vocab_size, SHAPES[name].get("seq", T)
    out = {}
    for method in methods:
        handle = None
        if method == "lce_compile":
            handle = patch(model)
        elif method == "liger":
            from liger_kernel.transformers import _apply_liger_kernel_to_instance
            _apply_liger_kernel_to_instance(model=model)
        timed = model
        if compiled:
            torch._dynamo.reset()  # a fresh compile per method: no graph or guard of the previous method's model
            torch._dynamo.utils.counters.clear()
            timed = torch.compile(model)
        try:
            r8 = measure(timed, 8, seq, vocab, device)
            if device.type == "cuda":
                r4 = measure(timed, 4, seq, vocab, device, reps=2)
                r8["largest_batch"] = largest_batch(timed, r4, r8, seq, vocab, device)
            if compiled:  # the graphs of the batch sizes above, and where dynamo split the model
                counters = torch._dynamo.utils.counters
                r8.update(graphs=counters["stats"]["unique_graphs"],
                          graph_breaks=sum(counters["graph_break"].values()))
            out[method] = r8
        except Exception as e:  # report, go on
            out[method] = {"error": f"{type(e).__name__}: {e}"[:300]}
        if handle: handle.remove()
        print(name, method, out[method], flush=True)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m lce_compile.bench.hf_step", description=__doc__.split("\n")[0])
    parser.add_argument("shape", choices=list(SHAPES))
    parser.add_argument("methods", help=f"comma-separated, of {','.join(METHODS)}")
    parser.add_argument("--compile", action="store_true", help="run each method's model as torch.compile(model)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cuda: bf16, time and memory; cpu: fp32, time and loss (default: cuda)")
    args = parser.parse_args(argv)
    methods = args.methods.split(",")
    if unknown := [m for m in methods if m not in METHODS]:
        parser.error(f"methods must be of {','.join(METHODS)}, got {','.join(unknown)}.")
    seq = SHAPES[args.shape].get("seq", T)
    res = {"shape": args.shape, "tokens": f"8 x {seq}", "compiled": args.compile,
           "dtype": str(DTYPES[args.device]).removeprefix("torch."), "torch": torch.__version__,
           "transformers": transformers.__version__,
           "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "results": run(args.shape, methods, args.device, args.compile)}
    suffix = "_compiled" if args.compile else ""
    path = os.path.join(os.environ.get("OUT", "."), f"hf_{args.shape}{suffix}.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
