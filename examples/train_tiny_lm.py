"""Train a tiny causal LM twice from one seed, with the unfused and the fused loss: the curves must agree.

Run: python examples/train_tiny_lm.py [--steps 200] [--out examples/train_tiny_lm.png]  (--out '' : no plot)
Each variant runs in its own child process; its peak memory is the growth of peak RSS (VmHWM, reset after
setup) over the training loop, with MALLOC_MMAP_THRESHOLD_=65536 so that freed buffers go back to the OS.
"""
import argparse, json, os, re, subprocess, sys, time

import torch
import torch.nn.functional as F
from torch import nn

from lce_compile import FusedOptions, linear_cross_entropy

CALLS = {"unfused": "F.cross_entropy(hidden @ W.T, targets)", "fused": "linear_cross_entropy(hidden, W, targets)"}


def rss_kib(field):
    return int(re.search(rf"{field}:\s+(\d+)", open("/proc/self/status").read()).group(1))


class TinyLM(nn.Module):
    def __init__(self, vocab, width, layers=2, max_seq=1024):
        super().__init__()
        self.embed, self.pos = nn.Embedding(vocab, width), nn.Parameter(torch.randn(max_seq, width) * 0.02)
        block = nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm, self.lm_head = nn.LayerNorm(width), nn.Linear(width, vocab, bias=False)

    def forward(self, tokens):  # (B, T) -> final hidden (B, T, D); the loss applies lm_head
        mask = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1])
        return self.norm(self.blocks(self.embed(tokens) + self.pos[: tokens.shape[1]], mask=mask, is_causal=True))


def batches(args):
    """A fixed random Markov chain: each token has 4 successors, drawn from a Zipf law over the vocab."""
    g = torch.Generator().manual_seed(1)
    zipf = 1.0 / torch.arange(1, args.vocab + 1)
    succ = torch.multinomial(zipf, 4 * args.vocab, replacement=True, generator=g).view(args.vocab, 4)
    for _ in range(args.steps):
        seq = [torch.randint(0, args.vocab, (args.batch,), generator=g)]
        for _ in range(args.seq):
            seq.append(succ[seq[-1], torch.randint(0, 4, (args.batch,), generator=g)])
        seq = torch.stack(seq, 1)
        yield seq[:, :-1], seq[:, 1:]


def train(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    model = TinyLM(args.vocab, args.width)
    opt, options = torch.optim.AdamW(model.parameters(), lr=args.lr), FusedOptions(chunk_size=args.chunk_size)
    data, losses = list(batches(args)), []
    open("/proc/self/clear_refs", "w").write("5")  # resets VmHWM to the current RSS
    base, start = rss_kib("VmRSS"), time.perf_counter()
    for inputs, targets in data:
        hidden = model(inputs)
        if args.variant == "unfused":
            loss = F.cross_entropy((hidden @ model.lm_head.weight.T).flatten(0, 1), targets.flatten())
        else:
            loss = linear_cross_entropy(hidden, model.lm_head.weight, targets, options=options)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    peak_mib = (rss_kib("VmHWM") - base) / 1024
    print(json.dumps({"losses": losses, "peak_mib": peak_mib, "seconds": time.perf_counter() - start}))


def plot(args, runs, rel):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return print("matplotlib is not installed: no plot")
    fig, ax = plt.subplots(figsize=(7, 4))
    for (variant, call), style in zip(CALLS.items(), ("-", "--")):
        ax.plot(runs[variant]["losses"], style, label=f"{call}: peak +{runs[variant]['peak_mib']:.1f} MiB")
    ax.set(xlabel="step", ylabel="loss (nats)", title=f"tiny LM, V={args.vocab}, {args.batch}x{args.seq} tokens/"
           f"step, fp32 CPU, max rel diff {rel:.1e}\npeak memory: growth of peak RSS over the training loop")
    ax.title.set_fontsize(9), ax.legend(), fig.tight_layout(), fig.savefig(args.out, dpi=100)
    print(f"saved {args.out}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag, default in (("--steps", 200), ("--vocab", 8192), ("--width", 128), ("--batch", 4), ("--seq", 128)):
        p.add_argument(flag, type=int, default=default)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--chunk-size", type=int, help="fused rows per chunk (default: the library's, 192 here). Chunks "
                   "sum the gradients in another order than one matmul; AdamW amplifies that fp32 rounding over the "
                   "steps, and faster at larger --lr (at 3e-3 the curves drift ~3e-3 apart by step 200, as the "
                   "unfused loss summed in two halves does)")
    p.add_argument("--threads", type=int, help="torch threads per run (default: torch's)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "train_tiny_lm.png"))
    p.add_argument("--variant", choices=tuple(CALLS), help=argparse.SUPPRESS)  # set in the child processes
    args = p.parse_args()
    if args.variant:
        return train(args)
    runs, env = {}, dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    for variant in CALLS:
        child = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--variant", variant],
                               env=env, stdout=subprocess.PIPE, text=True, check=True)
        run = runs[variant] = json.loads(child.stdout.splitlines()[-1])
        print(f"{variant:>8}: loss {run['losses'][0]:.3f} -> {run['losses'][-1]:.3f}, "
              f"peak memory +{run['peak_mib']:.1f} MiB, {run['seconds']:.1f} s")
    ref, got = torch.tensor(runs["unfused"]["losses"]), torch.tensor(runs["fused"]["losses"])
    rel = ((got - ref).abs() / ref.abs()).max().item()
    print(f"max relative difference over {len(ref)} steps: {rel:.3e}")
    if args.out:
        plot(args, runs, rel)
    sys.stdout.flush()
    sys.exit(0 if rel < 1e-3 else f"FAIL: fused and unfused losses differ by {rel:.3e} > 1e-3 relative")


if __name__ == "__main__":
    main()
