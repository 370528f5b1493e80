"""Train a tiny random Llama with transformers' Trainer, unpatched and patched: the loss curves must agree.

Run: python examples/hf_trainer.py [--steps 200] [--out examples/hf_trainer.png]   (about a minute on a laptop CPU)
Needs transformers (pip install "lce-compile[transformers]"); no downloads: random weights, random token data.
"""
import argparse, copy, sys, tempfile

import torch
import transformers

from lce_compile.integrations.transformers import patch


def tiny_llama(vocab):
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config)


def dataset(vocab, rows=256, seq=64):
    # a learnable stream: each token is the previous one plus 1..3 (mod vocab); a random-length prompt is masked
    g = torch.Generator().manual_seed(1)
    steps = torch.randint(1, 4, (rows, seq), generator=g)
    ids = (torch.randint(0, vocab, (rows, 1), generator=g) + steps.cumsum(-1)) % vocab
    prompt = torch.randint(0, seq // 2, (rows,), generator=g)
    labels = torch.where(torch.arange(seq) < prompt[:, None], -100, ids)
    return [{"input_ids": i, "labels": l} for i, l in zip(ids, labels)]


def losses(model, data, steps):
    with tempfile.TemporaryDirectory() as out:
        args = transformers.TrainingArguments(
            output_dir=out, max_steps=steps, per_device_train_batch_size=8, gradient_accumulation_steps=2,
            learning_rate=3e-3, logging_steps=1, use_cpu=True, report_to=[], save_strategy="no", seed=0,
            disable_tqdm=True, log_level="error")
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
        trainer.train()
        return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--out", default="examples/hf_trainer.png")
    args = parser.parse_args()
    data = dataset(args.vocab)
    model = tiny_llama(args.vocab)
    start = copy.deepcopy(model.state_dict())
    curves = {"unpatched": losses(model, data, args.steps)}
    model.load_state_dict(start)
    with patch(model):  # one line; removed when the block ends
        curves["patched"] = losses(model, data, args.steps)
    worst = max(abs(a - b) / abs(b) for a, b in zip(curves["patched"], curves["unpatched"]))
    for name, curve in curves.items():
        print(f"{name:>10}: loss {curve[0]:.4f} -> {curve[-1]:.4f} over {len(curve)} steps")
    print(f"max relative difference over {args.steps} steps: {worst:.2e}")
    if args.out:
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib is not installed: no plot")
        else:
            for name, curve in curves.items():
                plt.plot(curve, label=name, linestyle="-" if name == "unpatched" else "--")
            plt.xlabel("step"), plt.ylabel("training loss"), plt.legend()
            plt.title("tiny Llama with transformers.Trainer: unpatched vs lce_compile's patch")
            plt.savefig(args.out, dpi=100)
            print(f"plot: {args.out}")
    sys.exit(0 if worst < 1e-3 else 1)


if __name__ == "__main__":
    main()
