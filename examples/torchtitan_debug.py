"""Train torchtitan's llama3 debug model on the CPU with its stock loss and with lce_compile's: the curves must agree.

Run: python examples/torchtitan_debug.py [--steps 40] [--out docs/torchtitan.png] [--chunk-memory 1]   (minutes, CPU)
Needs torchtitan (pip install "lce-compile[torchtitan]") and matplotlib. No downloads: random init, synthetic tokens.
"""
import argparse, copy, time

import matplotlib
import torch
import torch.nn.functional as F
from torchtitan.models.llama3.config_registry import llama3_debugmodel

from lce_compile.integrations.torchtitan import lce_loss

BATCH, SEQ, LR = 4, 256, 8e-4  # LR: the debug config's AdamW


class CausalSDPA(torch.nn.Module):  # FlexAttention, the debug model's attention, has no CPU backward
    def forward(self, q, k, v, *, attention_masks=None, scale=None, enable_gqa=False, **kwargs):
        return F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=True,
                                              scale=scale, enable_gqa=enable_gqa).transpose(1, 2)


def train(model, loss_config, batches):
    loss_fn = loss_config.build()
    loss_fn.set_lm_head(model.lm_head)  # what torchtitan's trainer does for a ChunkedLossWrapper
    model._skip_lm_head = True
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
    curve, start = [], time.perf_counter()
    for tokens, labels in batches:
        loss, _ = loss_fn(model(tokens), labels, (labels != -100).sum())  # the trainer's on-device count
        loss.backward()
        optimizer.step(), optimizer.zero_grad()
        curve.append(loss.item())
    return curve, (time.perf_counter() - start) / len(batches)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", default="docs/torchtitan.png")
    parser.add_argument("--chunk-memory", type=float, default=None)  # lce_loss's JSON kwarg; on the CPU: D x it rows
    args = parser.parse_args()
    config = llama3_debugmodel()  # 6 layers, dim 256, vocab 2048
    vocab = config.model_spec.model.vocab_size
    torch.manual_seed(0)
    model = config.model_spec.model.build()
    with torch.no_grad():
        model.init_weights(buffer_device=torch.device("cpu"))
    for layer in model.layers.values():
        layer.attention.inner_attention = CausalSDPA()
    g = torch.Generator().manual_seed(1)  # a learnable stream: each token is the previous one + 1..3 (mod vocab)
    ids = (torch.randint(0, vocab, (args.steps, BATCH, 1), generator=g)
           + torch.randint(1, 4, (args.steps, BATCH, SEQ + 1), generator=g).cumsum(-1)) % vocab
    prompt = torch.arange(SEQ) < torch.randint(0, 32, (args.steps, BATCH, 1), generator=g)  # ignored labels
    batches = list(zip(ids[..., :-1], ids[..., 1:].masked_fill(prompt, -100)))
    curves = {"stock (ChunkedLossWrapper)": train(copy.deepcopy(model), config.loss, batches),
              "fused (lce_loss)": train(model, lce_loss(config.loss, chunk_memory=args.chunk_memory), batches)}
    (stock, _), (fused, _) = curves.values()
    worst = max(abs(a - b) / abs(b) for a, b in zip(fused, stock))
    for name, (curve, step) in curves.items():
        print(f"{name:>26}: loss {curve[0]:.4f} -> {curve[-1]:.4f} over {len(curve)} steps, {step:.2f} s/step")
    print(f"max relative difference over {args.steps} steps: {worst:.2e}")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    for (name, (curve, _)), style in zip(curves.items(), ("-", "--")):
        plt.plot(curve, style, label=name)
    plt.xlabel("step"), plt.ylabel("training loss"), plt.legend()
    plt.title(f"torchtitan llama3 debug model, CPU, {BATCH}x{SEQ} tokens/step")
    plt.savefig(args.out, dpi=100, bbox_inches="tight")
    assert worst < 1e-3, "the fused loss curve left the stock one"


if __name__ == "__main__":
    main()
