"""GRPO with TRL's GRPOTrainer, on TRL's own log-prob function and on lce_compile's: the same rewards and losses.

Run: python examples/trl_grpo.py [--steps 80]   (half a minute to a minute on a laptop CPU)
Needs trl (pip install trl); no downloads: a tiny random Llama, a word-level tokenizer over the words w0 .. w379,
random prompts, and a rule-based reward (the fraction of a completion's words with an even index). beta > 0, so TRL
also builds a reference model (from the saved policy). The run inside ``lce_compile.integrations.trl.use()`` computes
every log-prob, policy and reference, with the fused engine. Exits non-zero above 1e-3 relative difference.
The two differ by fp32 rounding only (another summation order), but training amplifies it: with a much higher learning
rate or many more steps, one sampled token eventually flips and the curves part, as between any two machines.
"""
import argparse, sys, tempfile
from statistics import mean

import datasets, torch, transformers, trl
from tokenizers import Tokenizer, models, pre_tokenizers

from lce_compile.integrations.trl import use

WORDS = [f"w{i}" for i in range(380)]


def save_tiny_llama_and_tokenizer(path):
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                         eos_token="</s>", unk_token="<unk>").save_pretrained(path)
    config = transformers.LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)


def even_words(completions, **kwargs):
    return [sum(int(w[1:]) % 2 == 0 for w in c.split() if w[1:].isdigit()) / max(len(c.split()), 1)
            for c in completions]


def curves(path, steps):
    g = torch.Generator().manual_seed(1)
    prompts = [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (6,), generator=g)) for _ in range(64)]
    args = trl.GRPOConfig(output_dir=path, max_steps=steps, per_device_train_batch_size=8, num_generations=8,
                          max_completion_length=12, beta=0.04, learning_rate=3e-3, logging_steps=1, use_cpu=True,
                          report_to=[], save_strategy="no", bf16=False, seed=0, disable_tqdm=True, log_level="error")
    trainer = trl.GRPOTrainer(model=path, reward_funcs=even_words, args=args,
                              train_dataset=datasets.Dataset.from_dict({"prompt": prompts}))
    trainer.remove_callback(transformers.PrinterCallback)  # disable_tqdm prints every log entry instead
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "reward" in entry]
    return {key: [entry[key] for entry in logs] for key in ("reward", "loss")}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=80)
    steps = parser.parse_args().steps
    torch.set_num_threads(1)  # a tiny model: more threads only wait on each other
    with tempfile.TemporaryDirectory() as path:
        save_tiny_llama_and_tokenizer(path)
        runs = {"trl": curves(path, steps)}
        with use():  # TRL's trainers now get their log-probs from lce_compile
            runs["fused"] = curves(path, steps)
    worst = 0.0
    for key in ("reward", "loss"):
        want, got = runs["trl"][key], runs["fused"][key]
        assert len(want) == len(got) == steps
        scale = max(map(abs, want))  # relative to the curve's size: the GRPO loss crosses zero
        worst = max(worst, max(abs(a - b) for a, b in zip(want, got)) / scale)
        for name, run in runs.items():
            print(f"{name:>6}: {key} {mean(run[key][:5]):+.4f} (mean of the first 5 steps) -> "
                  f"{mean(run[key][-5:]):+.4f} (last 5)")
    print(f"max relative difference over {steps} steps: {worst:.2e}")
    if worst > 1e-3:
        sys.exit("the fused run disagrees with TRL's")


if __name__ == "__main__":
    main()
