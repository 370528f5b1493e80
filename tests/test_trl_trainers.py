"""integrations.trl end to end: SFTTrainer, DPOTrainer and GRPOTrainer (with a reference model) train a tiny random
Llama for a few steps, once on TRL's own log-prob function and once inside ``lce_compile.integrations.trl.use()``;
the swap is called, every logged metric and every final parameter agree. Also runs examples/trl_grpo.py.

TRL 1.16 needs no flag for this: each of the three trainers calls ``add_fused_lm_head`` unconditionally in
``__init__`` (policy and reference model) and computes its log-probs with ``model(..., fused_lm_head=True)``. The one
exception is SFT with a ``compute_loss_func`` or label smoothing, whose loss then comes from full logits (the fused
outputs only feed the metrics); the SFT test uses neither.

CPU, fp32, no downloads: the model is built by ``from_config`` and saved to a temporary folder (GRPO and DPO build
their reference model from the policy's ``_name_or_path``), the tokenizer is a WordLevel one built in memory.
"""
import math
import re

import pytest
import torch

pytest.importorskip("trl")
import datasets  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402
import trl.trainer.utils as trl_utils  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402

from lce_compile.integrations import trl as lce_trl  # noqa: E402
from test_examples import run_example  # noqa: E402

VOCAB = 384  # 4 special tokens and the words w0 .. w379
WORDS = [f"w{i}" for i in range(VOCAB - 4)]
# Wall-clock metrics differ between any two runs
TIMING = re.compile(r"(runtime|per_second|step_time)$")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # A tiny model: on shared CI cores, more torch threads only wait on each other (here 2 threads made each small
    # matmul ~15 ms instead of ~0.1 ms, and these tests 3x slower)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_tokenizer():
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                                eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Llama (untied head, so the head weight is its own parameter) and its tokenizer, on disk."""
    path = tmp_path_factory.mktemp("tiny_llama")
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # a less uniform start than std 0.02: the log-probs and their gradients are not tiny
        model.lm_head.weight.normal_(0, 0.5)
    model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return str(path)


def sentences(n, length, seed):
    g = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (length,), generator=g)) for _ in range(n)]


def common_args(tmp_path, **kw):
    return dict(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-3,
                logging_steps=1, use_cpu=True, report_to=[], save_strategy="no", bf16=False, seed=0,
                dataloader_num_workers=0, **kw)


def train(make_trainer, fused):
    """Trains once; returns (log_history, final parameters, calls to TRL's function and to the fused one)."""
    calls = {"trl": 0, "fused": 0}
    with pytest.MonkeyPatch.context() as mp:  # count the calls (TRL's function and ours, as installed now)
        for name, cls in (("trl", trl_utils._ChunkedLogProbFunction), ("fused", lce_trl.FusedLogProbFunction)):
            def counting(*args, _apply=cls.apply, _name=name, **kwargs):
                calls[_name] += 1
                return _apply(*args, **kwargs)
            mp.setattr(cls, "apply", counting)
        trainer = make_trainer()
        if fused:
            with lce_trl.use():
                trainer.train()
        else:
            trainer.train()
    assert trl_utils._ChunkedLogProbFunction is not lce_trl.FusedLogProbFunction
    params = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    return trainer.state.log_history, params, calls


def assert_runs_agree(make_trainer):
    plain_log, plain_params, plain_calls = train(make_trainer, False)
    fused_log, fused_params, fused_calls = train(make_trainer, True)
    # (a) each run took its own path, and only it
    assert plain_calls["trl"] > 0 and plain_calls["fused"] == 0, plain_calls
    assert fused_calls["fused"] > 0 and fused_calls["trl"] == 0, fused_calls
    assert fused_calls["fused"] == plain_calls["trl"]
    # (b) every logged metric
    assert len(plain_log) == len(fused_log) > 1
    for step, (want, got) in enumerate(zip(plain_log, fused_log)):
        assert want.keys() == got.keys(), step
        for key in want:
            if TIMING.search(key):
                continue
            w, g = want[key], got[key]
            if isinstance(w, float) and not math.isfinite(w):
                assert str(w) == str(g), (step, key, w, g)
            else:  # abs: DPO's rewards/* are beta * (sum of ~30 log-probs ~ -90, minus the reference's), so fp32
                # rounding of those sums (~4e-6) leaves ~2e-6 on a reward of ~0.01; every other metric agrees to ~1e-6
                assert g == pytest.approx(w, rel=1e-4, abs=1e-5), f"step {step} {key}: {g} != {w}"
    # (c) the final parameters. fp32 rounding differs (another summation order over V), and AdamW divides each update
    # by sqrt(second moment): where a gradient entry is near zero, a rounding-level difference in it moves that
    # parameter by up to ~lr. With lr 1e-3 over 4 steps they stay within 1e-5 (seen: 5e-7); a 0.1% error in
    # the log-probs moves parameters by ~2e-3.
    assert plain_params.keys() == fused_params.keys()
    for name in plain_params:
        torch.testing.assert_close(fused_params[name], plain_params[name], rtol=0, atol=1e-5,
                                   msg=lambda m: f"{name}: {m}")
    return plain_log


def sft_trainer(model_dir, tmp_path):
    data = datasets.Dataset.from_dict({"text": sentences(12, 20, seed=1)})

    def make_trainer():
        args = trl.SFTConfig(**common_args(tmp_path), max_length=32)
        return trl.SFTTrainer(model=model_dir, args=args, train_dataset=data, processing_class=make_tokenizer())
    return make_trainer


def test_sft_trainer(model_dir, tmp_path):
    log = assert_runs_agree(sft_trainer(model_dir, tmp_path))
    assert {"loss", "entropy", "mean_token_accuracy"} <= log[0].keys()  # entropy, is_top1 come from the swap too


def test_a_slightly_wrong_swap_fails(model_dir, tmp_path, monkeypatch):
    """The comparison can fail: log-probs at a temperature 0.1% off change the first loss (and all else)."""
    right = lce_trl.FusedLogProbFunction.apply

    def wrong(hidden, weight, bias, targets, temperature, *args, **kwargs):
        return right(hidden, weight, bias, targets, temperature * 1.001, *args, **kwargs)

    monkeypatch.setattr(lce_trl.FusedLogProbFunction, "apply", wrong)
    with pytest.raises(AssertionError, match="step 0 loss"):
        assert_runs_agree(sft_trainer(model_dir, tmp_path))


def test_dpo_trainer(model_dir, tmp_path):
    # completions start with a space: the word-level tokenizer would merge "w1" + "w2" into one unknown word
    data = datasets.Dataset.from_dict({"prompt": sentences(12, 6, seed=2),
                                       "chosen": [" " + s for s in sentences(12, 8, seed=3)],
                                       "rejected": [" " + s for s in sentences(12, 5, seed=4)]})

    def make_trainer():
        args = trl.DPOConfig(**common_args(tmp_path), max_length=32, beta=0.5)
        return trl.DPOTrainer(model=model_dir, args=args, train_dataset=data, processing_class=make_tokenizer())

    log = assert_runs_agree(make_trainer)
    assert {"loss", "rewards/chosen", "logps/rejected", "logits/chosen"} <= log[0].keys()  # policy and reference


def even_words(completions, **kwargs):
    """Rule-based reward: the fraction of a completion's words with an even index."""
    rewards = []
    for text in completions:
        words = text.split()
        rewards.append(sum(int(w[1:]) % 2 == 0 for w in words if w[1:].isdigit()) / max(len(words), 1))
    return rewards


def test_grpo_trainer_with_reference_model(model_dir, tmp_path):
    data = datasets.Dataset.from_dict({"prompt": sentences(8, 5, seed=5)})

    def make_trainer():
        # beta > 0: a reference model; num_iterations=2: each generation trains 2 steps, so the old policy's
        # log-probs are computed too and the second step's ratio is not 1; temperature and an entropy bonus
        # (the entropy's gradient) go through the swap as well
        args = trl.GRPOConfig(**common_args(tmp_path), num_generations=4, max_completion_length=8, beta=0.1,
                              num_iterations=2, temperature=0.9, entropy_coef=0.01)
        return trl.GRPOTrainer(model=model_dir, reward_funcs=even_words, args=args, train_dataset=data,
                               processing_class=make_tokenizer())

    log = assert_runs_agree(make_trainer)
    assert {"loss", "reward", "kl", "entropy"} <= log[0].keys()
    assert max(entry.get("kl", 0) for entry in log) > 0 and log[0]["reward_std"] > 0  # not a trivial loss


def test_trl_grpo_example():
    out = run_example("trl_grpo.py", "--steps", "6")
    rel = float(re.search(r"max relative difference over 6 steps: (\S+)", out).group(1))
    assert rel < 1e-5, out  # the script exits non-zero above 1e-3; fp32 rounding alone stays near 1e-8
    assert re.search(r"^ +fused: reward ", out, re.M) and re.search(r"^ +trl: loss ", out, re.M), out
