"""One transformers training step on CUDA (forward + backward, bf16, random-initialised real-size config):
unpatched vs lce_compile's patch vs Liger's instance patch; time, peak above the weights, the largest batch.

Run: python -m lce_compile.bench.hf_step llama3.2-1b unpatched,lce_compile,liger   (writes $OUT/hf_<shape>.json)
"""
import gc, json, sys, time, os
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
}
T, GIB = 2048, 1 << 30
BUDGET = 135 * GIB  # "the same memory": what each method may use on the 139 GiB H200, weights included


def build(name):
    kw = dict(SHAPES[name]); cls = getattr(transformers, kw.pop("cls"))
    cfg = cls(attn_implementation="sdpa", **kw)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    return model.train()


def batch(b, vocab):
    g = torch.Generator(device="cuda").manual_seed(b)
    ids = torch.randint(0, vocab, (b, T), device="cuda", generator=g)
    return ids, ids.clone()


def step(model, ids, labels):
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    return loss


def measure(model, b, vocab, reps=5):
    ids, labels = batch(b, vocab)
    for p in model.parameters(): p.grad = None
    gc.collect(); torch.cuda.empty_cache(); torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step(model, ids, labels); torch.cuda.synchronize()  # warm-up (compiles), grads allocated
    step(model, ids, labels); torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        loss = step(model, ids, labels)
    torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) / reps * 1e3
    peak = torch.cuda.max_memory_allocated()
    for p in model.parameters(): p.grad = None
    return {"ms": ms, "peak_above_weights_gib": (peak - base) / GIB, "weights_gib": base / GIB, "loss": loss.item()}


def fits(model, b, vocab):
    try:
        ids, labels = batch(b, vocab)
        step(model, ids, labels); torch.cuda.synchronize()
        ok = torch.cuda.max_memory_allocated() <= BUDGET
    except torch.OutOfMemoryError:
        ok = False
    for p in model.parameters(): p.grad = None
    gc.collect(); torch.cuda.empty_cache()
    return ok


def largest_batch(model, r4, r8, vocab):
    per_b = (r8["peak_above_weights_gib"] - r4["peak_above_weights_gib"]) / 4
    fixed = r4["weights_gib"] + r4["peak_above_weights_gib"] - 4 * per_b
    b = int((BUDGET / GIB - fixed) / per_b)
    torch.cuda.reset_peak_memory_stats()
    for _ in range(5):
        if fits(model, b, vocab):
            return b
        b -= max(1, b // 20)
        torch.cuda.reset_peak_memory_stats()
    return None


def run(name, methods):
    model = build(name); vocab = model.config.vocab_size
    out = {}
    for method in methods:
        handle = None
        if method == "lce_compile":
            handle = patch(model)
        elif method == "liger":
            from liger_kernel.transformers import _apply_liger_kernel_to_instance
            _apply_liger_kernel_to_instance(model=model)
        try:
            r8 = measure(model, 8, vocab); r4 = measure(model, 4, vocab, reps=2)
            r8["largest_batch"] = largest_batch(model, r4, r8, vocab)
            out[method] = r8
        except Exception as e:  # report, go on
            out[method] = {"error": f"{type(e).__name__}: {e}"[:300]}
        if handle: handle.remove()
        print(name, method, out[method], flush=True)
    return out


if __name__ == "__main__":
    name = sys.argv[1]
    res = {"shape": name, "tokens": f"8 x {T}", "torch": torch.__version__, "transformers": transformers.__version__,
           "device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "results": run(name, sys.argv[2].split(","))}
    path = os.path.join(os.environ.get("OUT", "."), f"hf_{name}.json")
    json.dump(res, open(path, "w"), indent=1)
