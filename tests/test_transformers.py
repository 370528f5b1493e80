"""integrations.transformers on tiny random configs (no downloads): every parameter's gradient equals the unpatched
model's, no (tokens x vocab) tensor in the step, eval untouched, remove() restores, refusals, Trainer, PEFT."""
import contextlib
import copy
import functools

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
from lce_compile.integrations.transformers import patch  # noqa: E402
from memtrack import AllocationTracker  # noqa: E402

V, D, B, T = 2048, 32, 2, 128
_COMMON = dict(vocab_size=V, hidden_size=D, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=1, max_position_embeddings=T, attn_implementation="eager")
FAMILIES = {  # family -> its config; the comment says what the family adds to the mechanism
    "llama": lambda: transformers.LlamaConfig(**_COMMON),
    "qwen2": lambda: transformers.Qwen2Config(**_COMMON),
    "qwen3": lambda: transformers.Qwen3Config(head_dim=16, **_COMMON),
    "mistral": lambda: transformers.MistralConfig(**_COMMON),
    "gemma2": lambda: transformers.Gemma2Config(head_dim=16, final_logit_softcapping=3.0, **_COMMON),  # softcap, tied
    "gemma3_text": lambda: transformers.Gemma3TextConfig(head_dim=16, final_logit_softcapping=2.5, **_COMMON),
    "mixtral": lambda: transformers.MixtralConfig(num_local_experts=4, num_experts_per_tok=2,
                                                  output_router_logits=True, **_COMMON),  # router aux loss added
    "granite": lambda: transformers.GraniteConfig(logits_scaling=4.0, **_COMMON),  # divides the logits
    "cohere": lambda: transformers.CohereConfig(logit_scale=0.25, **_COMMON),  # multiplies them
    "olmo2": lambda: transformers.Olmo2Config(**_COMMON),
    "phi3": lambda: transformers.Phi3Config(pad_token_id=0, **_COMMON),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=V, n_embd=D, n_layer=2, n_head=2, n_positions=T,
                                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,  # same every run
                                            attn_implementation="eager"),  # tied
}


def _model(family, seed=0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(FAMILIES[family]())
    with torch.no_grad():  # logits of std ~3, so that a softcap and a scale matter
        model.get_output_embeddings().weight.normal_(0, 0.5)
    return model.float().train()


def _batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=g)
    labels = ids.clone()
    labels[0, :40] = -100  # a prompt, and an uneven count of labels per row
    labels[1, -7:] = -100
    return ids, labels


def _step(model, ids, labels, **kw):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=labels, **kw)
    out.loss.backward()
    return out, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_loss_gradients_memory_eval_and_remove(family):
    model = _model(family)
    ids, labels = _batch()
    want, want_grads = _step(model, ids, labels)
    model.eval()
    with torch.no_grad():
        eval_logits = model(input_ids=ids).logits
    model.train()
    head = model.get_output_embeddings()

    handle = patch(model)
    with AllocationTracker(inputs=[*model.parameters(), ids, labels]) as tracker:
        got, got_grads = _step(model, ids, labels)
    torch.testing.assert_close(got.loss, want.loss)
    assert got.logits.shape == (B, 0, V)
    assert got_grads.keys() == want_grads.keys()
    for name, grad in got_grads.items():
        torch.testing.assert_close(grad, want_grads[name], msg=lambda m: f"{family} {name}: {m}")
    # the largest tensor is one chunk of logits: 64 rows on the CPU, a quarter of N x V here
    assert tracker.largest <= B * T * V // 4, f"a tensor of {tracker.largest} elements (N x V = {B * T * V})"
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, eval_logits, rtol=0, atol=0)
        torch.testing.assert_close(model(input_ids=ids, labels=labels).logits, eval_logits, rtol=0, atol=0)
    model.train()

    handle.remove()
    assert "forward" not in head.__dict__ and "_loss_function" not in model.__dict__
    assert not model._forward_pre_hooks and not model._forward_hooks
    with AllocationTracker(inputs=[*model.parameters(), ids, labels]) as tracker:
        again, _ = _step(model, ids, labels)
    assert again.logits.shape == (B, T, V) and tracker.largest >= B * T * V  # the tracker sees full logits


def test_num_items_in_batch_shift_labels_and_z_loss():
    model = _model("llama")
    ids, labels = _batch()
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:].contiguous()
    # labels must be given for a loss; with shift_labels they are not read (ids here, so a mix-up shows)
    want, want_grads = _step(model, ids, ids, shift_labels=shifted, num_items_in_batch=torch.tensor(500))
    with patch(model):
        got, got_grads = _step(model, ids, ids, shift_labels=shifted, num_items_in_batch=torch.tensor(500))
    torch.testing.assert_close(got.loss, want.loss)
    for name, grad in got_grads.items():
        torch.testing.assert_close(grad, want_grads[name])

    with patch(model, z_loss=1e-2):  # z_loss changes the loss on purpose: the unfused z-loss added by hand
        loss = model(input_ids=ids, labels=labels).loss
    logits = model(input_ids=ids).logits.float()
    kept = shifted != -100
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), shifted.flatten(), reduction="sum")
    z = (logits.logsumexp(-1).square() * kept).sum()
    torch.testing.assert_close(loss, (ce + 1e-2 * z) / kept.sum())


def test_positional_labels_and_training_only_false():
    model = _model("qwen2")
    ids, labels = _batch()
    want = model(ids, None, None, None, None, labels).loss
    with patch(model, training_only=False):
        model.eval()
        out = model(ids, None, None, None, None, labels)
    torch.testing.assert_close(out.loss, want)
    assert out.logits.shape == (B, 0, V)


class _InlineLoss(transformers.LlamaForCausalLM):
    """Computes its loss inline, as encoder-decoder decoders and XLNet do."""

    def forward(self, input_ids=None, labels=None, **kwargs):
        logits = self.lm_head(self.model(input_ids=input_ids).last_hidden_state)
        loss = None if labels is None else nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1),
                                                                        labels[:, 1:].flatten())
        return transformers.modeling_outputs.CausalLMOutput(loss=loss, logits=logits)


class _ShiftedLogits(transformers.LlamaForCausalLM):
    """Adds a constant between its head and its loss: not an identity, a scale or a softcap."""

    def forward(self, input_ids=None, labels=None, **kwargs):
        logits = self.lm_head(self.model(input_ids=input_ids).last_hidden_state) + 1.0
        loss = None if labels is None else self.loss_function(logits=logits, labels=labels, vocab_size=V, **kwargs)
        return transformers.modeling_outputs.CausalLMOutput(loss=loss, logits=logits)


def test_refusals_are_early_and_name_the_model():
    config = FAMILIES["llama"]()
    with pytest.raises(ValueError, match=r"patch\(_InlineLoss\): its forward computes the loss without "
                                         r"self.loss_function"):
        patch(_InlineLoss(config))
    shifted = _ShiftedLogits(config)
    with pytest.raises(ValueError, match=r"patch\(_ShiftedLogits\): the logits its loss receives are not its "
                                         r"output layer's output under an identity, a scale or a softcap"):
        patch(shifted)
    assert "forward" not in shifted.lm_head.__dict__ and not shifted._forward_pre_hooks  # nothing patched
    model = _model("llama")
    model.lm_head = nn.Sequential(model.lm_head)
    with pytest.raises(ValueError, match=r"patch\(LlamaForCausalLM\): its output layer is a Sequential"):
        patch(model)
    model = _model("llama")
    model.loss_function = lambda logits, labels, vocab_size, **kw: logits.float().mean()
    with pytest.raises(ValueError, match=r"patch\(LlamaForCausalLM\): its loss_function is .*<lambda>, not "
                                         r"transformers' ForCausalLMLoss"):
        patch(model)
    with patch(_model("llama")) as handle, pytest.raises(ValueError, match="already patched"):
        patch(handle.model)
    with pytest.raises(ValueError, match="z_loss must be >= 0"):
        patch(_model("llama"), z_loss=-1.0)


def test_peft_lora_fused_and_lora_head_refused():
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "gate_proj"], lora_dropout=0.0)
    model = peft.get_peft_model(_model("llama"), lora)
    with torch.no_grad():  # LoRA's B starts at 0; make the adapters matter
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    ids, labels = _batch()
    want, want_grads = _step(model, ids, labels)
    with patch(model):
        got, got_grads = _step(model, ids, labels)
    assert got.logits.shape == (B, 0, V) and got_grads.keys() == want_grads.keys()
    torch.testing.assert_close(got.loss, want.loss)
    for name, grad in got_grads.items():
        torch.testing.assert_close(grad, want_grads[name])
    head_lora = peft.get_peft_model(_model("llama"), peft.LoraConfig(r=4, target_modules=["lm_head"]))
    with pytest.raises(ValueError, match="its output layer is a Linear, not a plain nn.Linear"):
        patch(head_lora)


def _train(model, grad_accumulation, tmp_path, make_trainer=transformers.Trainer, **args):
    g = torch.Generator().manual_seed(3)
    rows = []
    for i in range(12):
        ids = torch.randint(0, V, (64,), generator=g)
        labels = ids.clone()
        labels[: 5 * i] = -100  # uneven label counts across micro-batches
        rows.append({"input_ids": ids, "labels": labels})
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=grad_accumulation,
        max_steps=3, learning_rate=1e-3, logging_steps=1, use_cpu=True, report_to=[], save_strategy="no", seed=0,
        dataloader_drop_last=True, disable_tqdm=True, **args)
    trainer = make_trainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return losses, {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("grad_accumulation", [1, 2])
def test_trainer_logs_and_ends_the_same(grad_accumulation, tmp_path):
    model = _model("llama")
    start = copy.deepcopy(model.state_dict())
    want_losses, want_params = _train(model, grad_accumulation, tmp_path)
    model.load_state_dict(start)
    with patch(model):
        got_losses, got_params = _train(model, grad_accumulation, tmp_path)
    assert len(got_losses) == 3
    torch.testing.assert_close(torch.tensor(got_losses), torch.tensor(want_losses), rtol=1e-5, atol=1e-6)
    for name, p in got_params.items():  # AdamW's m / sqrt(v) magnifies rounding in near-zero gradients: the bound
        torch.testing.assert_close(p, want_params[name], rtol=1e-5, atol=1e-5)  # is 1% of one step (lr 1e-3)


class _RecordingTrainer(transformers.Trainer):
    """Records, per micro-batch, whether the model it ran was compiled and the shape of the logits it returned."""

    def __init__(self, *args, seen, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = seen

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        self.seen.append((isinstance(model, torch._dynamo.eval_frame.OptimizedModule), tuple(outputs.logits.shape)))
        return (loss, outputs) if return_outputs else loss


def test_trainer_torch_compile_trains_on_the_fused_loss(tmp_path):
    """TrainingArguments(torch_compile=True): the Trainer runs torch.compile(model) (inductor, graph breaks
    allowed) with the patch's hooks inside; the patched model logs the unpatched model's losses, and every step's
    forward ran the fused loss (its output layer returned the (B, 0, V) placeholder)."""
    torch._dynamo.reset()
    runs = {}
    try:
        for patched in (False, True):
            # a fresh model each run: a Trainer that compiles a model marks it prepared (accelerate), and a second
            # Trainer then runs it uncompiled
            model, seen = _model("llama"), []
            with patch(model) if patched else contextlib.nullcontext():
                losses, params = _train(model, 1, tmp_path, functools.partial(_RecordingTrainer, seen=seen),
                                        torch_compile=True)
            runs[patched] = losses, params, seen
    finally:
        torch._dynamo.reset()
    (want_losses, want_params, want_seen), (got_losses, got_params, got_seen) = runs[False], runs[True]
    assert want_seen == [(True, (2, 64, V))] * 3  # compiled, full logits
    assert got_seen == [(True, (2, 0, V))] * 3  # compiled, the fused loss in every step
    assert len(got_losses) == 3
    torch.testing.assert_close(torch.tensor(got_losses), torch.tensor(want_losses), rtol=1e-4, atol=1e-6)
    for name, p in got_params.items():  # as in test_trainer_logs_and_ends_the_same
        torch.testing.assert_close(p, want_params[name], rtol=1e-5, atol=1e-5)


def test_import_lce_compile_does_not_import_transformers():
    import subprocess
    import sys
    code = "import sys, lce_compile, lce_compile.integrations; assert 'transformers' not in sys.modules; print('ok')"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "ok"
