"""Bad input gets a ValueError/TypeError naming the argument and what was expected (wording pinned)."""
import expecttest
import pytest
import torch
import torch.nn.functional as F

from lce_compile import (FusedOptions, LinearCrossEntropyLoss, LinearDPOLoss, LinearGRPOLoss, fused_loss,
                         linear_cross_entropy, linear_dpo_loss, linear_grpo_loss, linear_kd_loss, linear_token_logprobs)

H, W, T = torch.randn(4, 8), torch.randn(11, 8), torch.randint(0, 11, (4,))


def _message(call):
    try:
        call()
    except (ValueError, TypeError, NotImplementedError) as error:
        return f"{type(error).__name__}: {error}"
    raise AssertionError("no error raised")


class TestErrors(expecttest.TestCase):
    def test_hidden_weight_mismatch(self):
        self.assertExpectedInline(_message(lambda: linear_cross_entropy(torch.randn(4, 7), W, T)), """\
ValueError: linear_cross_entropy: hidden's last dimension must equal weight's D = 8 (weight is (V, D) = (11, 8)), got hidden (4, 7).""")
        self.assertExpectedInline(_message(lambda: linear_cross_entropy(H, W[0], T)), """\
ValueError: linear_cross_entropy: weight must have shape (V, D), got (8,).""")

    def test_dtype_mismatch(self):
        self.assertExpectedInline(_message(lambda: linear_cross_entropy(H, W.double(), T)), """TypeError: linear_cross_entropy: hidden and weight must have one dtype, got torch.float32 and torch.float64. Cast one, or run the loss under torch.autocast.""")
        self.assertExpectedInline(_message(lambda: linear_cross_entropy(H.long(), W, T)), """TypeError: linear_cross_entropy: hidden must be float32, bfloat16, float16 or float64, got torch.int64.""")

    def test_targets_shape(self):
        self.assertExpectedInline(_message(lambda: linear_cross_entropy(H.view(2, 2, 8), W, T)), """\
ValueError: linear_cross_entropy: targets must have the leading shape of hidden (2, 2), got (4,).""")
        self.assertExpectedInline(_message(lambda: fused_loss(F.cross_entropy)(H, W, T[:3])), """\
ValueError: fused_loss(cross_entropy): targets must have the leading shape of hidden (4,), got (3,).""")

    def test_non_integer_targets(self):
        self.assertExpectedInline(_message(lambda: linear_cross_entropy(H, W, T.float())), """\
TypeError: linear_cross_entropy: targets must be an integer tensor of class indices, got torch.float32. Probability targets need the full (N, V) tensor and are not supported.""")

    def test_targets_out_of_range(self):
        self.assertExpectedInline(_message(lambda: linear_cross_entropy(H, W, torch.tensor([0, 11, 2, 3]))), """\
ValueError: linear_cross_entropy: targets must be in [0, 11) or ignore_index=-100, got 11.""")
        self.assertExpectedInline(_message(lambda: fused_loss(F.cross_entropy)(H, W, torch.tensor([0, -1, 2, 3]))), """\
ValueError: fused_loss(cross_entropy): targets must be in [0, 11) or ignore_index=-100, got -1.""")
        # the ignore_index itself is fine, and validation can be switched off
        linear_cross_entropy(H, W, torch.tensor([0, -100, 2, 3]))
        linear_cross_entropy(H, W, torch.tensor([0, 7, 2, 3]), ignore_index=7)

    def test_mismatched_devices(self):
        self.assertExpectedInline(_message(lambda: linear_cross_entropy(H, W.to("meta"), T)), """\
ValueError: linear_cross_entropy: weight must be on hidden's device cpu, got meta.""")
        self.assertExpectedInline(_message(lambda: linear_cross_entropy(H, W, T.to("meta"))), """\
ValueError: linear_cross_entropy: targets must be on hidden's device cpu, got meta.""")

    def test_unknown_keyword(self):
        self.assertExpectedInline(_message(lambda: fused_loss(F.cross_entropy)(H, W, T, ignore_idx=3)), """\
TypeError: fused_loss(cross_entropy): unknown keyword 'ignore_idx'; cross_entropy accepts weight, size_average, ignore_index, reduce, reduction, label_smoothing (plus bias= and options= for the fused call).""")
        self.assertExpectedInline(_message(lambda: linear_cross_entropy(H, W, T, ignore_idx=3)), """\
TypeError: linear_cross_entropy() got an unexpected keyword argument 'ignore_idx'""")

    def test_bias_and_class_weight(self):
        self.assertExpectedInline(_message(lambda: linear_cross_entropy(H, W, T, bias=torch.randn(10))), """\
ValueError: linear_cross_entropy: bias must have shape (V,) = (11,), got (10,).""")
        self.assertExpectedInline(_message(lambda: linear_cross_entropy(H, W, T, class_weight=torch.rand(3))), """\
ValueError: linear_cross_entropy: class_weight must have shape (V,) = (11,), got (3,).""")

    def test_options(self):
        self.assertExpectedInline(_message(lambda: linear_cross_entropy(H, W, T, reduction="avg")), """\
ValueError: linear_cross_entropy: reduction must be one of 'mean', 'sum', 'none', got 'avg'.""")
        self.assertExpectedInline(_message(lambda: linear_cross_entropy(H, W, T, softcap=-1.0)), """\
ValueError: linear_cross_entropy: softcap must be a positive finite float or None, got -1.0.""")
        # one check of the logit transforms for every loss
        self.assertExpectedInline(_message(lambda: linear_token_logprobs(H, W, T, logit_scale=-1.0)), """\
ValueError: linear_token_logprobs: logit_scale must be a positive finite float, got -1.0.""")
        self.assertExpectedInline(_message(lambda: linear_cross_entropy(H, W, T, logit_scale=0.0)), """\
ValueError: linear_cross_entropy: logit_scale must be a positive finite float, got 0.0.""")
        self.assertExpectedInline(_message(lambda: FusedOptions(chunk_size=0)), """\
ValueError: FusedOptions: chunk_size must be a positive int or None, got 0.""")
        self.assertExpectedInline(_message(lambda: FusedOptions(grad_weight_dtype=torch.int32)), """\
TypeError: FusedOptions: grad_weight_dtype must be a floating torch.dtype or None, got torch.int32.""")
        self.assertExpectedInline(_message(lambda: LinearCrossEntropyLoss(reduction="mean ")), """\
ValueError: LinearCrossEntropyLoss: reduction must be one of 'mean', 'sum', 'none', got 'mean '.""")
        self.assertExpectedInline(_message(lambda: fused_loss(F.cross_entropy, returns="avg")), """\
ValueError: fused_loss: returns must be one of 'rows', 'sum', 'mean', got 'avg'.""")

    def test_custom_loss_inputs(self):
        def rows(logits, targets, mask):
            return F.cross_entropy(logits, targets, reduction="none") * mask

        self.assertExpectedInline(_message(lambda: fused_loss(rows)(H, W, T, torch.ones(5))), """\
ValueError: fused_loss(rows): mask must have the leading shape of hidden (4,), got (5,).""")
        mask = torch.ones(4, requires_grad=True)
        self.assertExpectedInline(_message(lambda: fused_loss(rows)(H, W, T, mask)), """\
NotImplementedError: fused_loss(rows): mask requires grad; only hidden, weight and bias get gradients. Pass mask.detach().""")

    def test_validation_is_skipped_when_asked(self):
        # unchecked out-of-range targets give NaN (no read-back, no device-side assert), never a number
        loss = linear_cross_entropy(H, W, torch.tensor([0, 11, 2, 3]), options=FusedOptions(validate=False))
        self.assertTrue(loss.isnan())
        # with label smoothing and class weights too
        loss = linear_cross_entropy(H, W, torch.tensor([0, 11, 2, 3]), label_smoothing=0.1,
                                    class_weight=torch.rand(11), options=FusedOptions(validate=False))
        self.assertTrue(loss.isnan())
        # fused_loss(F.cross_entropy / F.nll_loss): the same behaviour, whatever the keywords and the weight's layout
        # (the vocabulary-parallel forms: tests/test_distributed.py)
        for fn, kw in ((F.cross_entropy, {}), (F.cross_entropy, {"weight": torch.rand(11), "label_smoothing": 0.1}),
                       (F.nll_loss, {}), (F.nll_loss, {"weight": torch.rand(11)})):
            loss = fused_loss(fn)(H, W, torch.tensor([0, 11, 2, 3]), options=FusedOptions(validate=False), **kw)
            self.assertTrue(loss.isnan(), f"{fn.__name__} {kw}")
            message = _message(lambda: fused_loss(fn)(H, W, torch.tensor([0, 11, 2, 3]), **kw))
            self.assertEqual(message, f"ValueError: fused_loss({fn.__name__}): targets must be in [0, 11) or "
                                      f"ignore_index=-100, got 11.")

    def test_distillation_inputs(self):
        teacher_h, teacher_w = torch.randn(4, 6), torch.randn(11, 6)
        self.assertExpectedInline(_message(lambda: linear_kd_loss(H, W, teacher_h, torch.randn(12, 6))), """\
ValueError: linear_kd_loss: teacher_weight must have the student's vocabulary V = 11, got (12, 6).""")
        self.assertExpectedInline(_message(lambda: linear_kd_loss(H, W, teacher_h[:3], teacher_w)), """ValueError: linear_kd_loss: teacher_hidden must have hidden's leading shape (4,) (one teacher row per token), got (3, 6).""")
        self.assertExpectedInline(_message(lambda: linear_kd_loss(H, W, teacher_h, teacher_w.T)), """\
ValueError: linear_kd_loss: teacher_hidden's last dimension must equal teacher_weight's D = 11 (teacher_weight is (V, D) = (6, 11)), got teacher_hidden (4, 6).""")
        self.assertExpectedInline(_message(lambda: linear_kd_loss(H, W, teacher_h, teacher_w.long())), """TypeError: linear_kd_loss: teacher_weight must be float32, bfloat16, float16 or float64, got torch.int64.""")
        self.assertExpectedInline(_message(lambda: linear_kd_loss(H, W, teacher_h, teacher_w, kind="kl")), """\
ValueError: linear_kd_loss: kind must be one of 'forward_kl', 'reverse_kl', 'jsd', got 'kl'.""")
        self.assertExpectedInline(_message(lambda: linear_kd_loss(H, W, teacher_h, teacher_w, hard_weight=0.5)), """\
ValueError: linear_kd_loss: hard_weight=0.5 needs targets for its cross-entropy, got None.""")
        self.assertExpectedInline(_message(lambda: linear_kd_loss(H, W, teacher_h, teacher_w, kind="jsd", beta=1.5)), """\
ValueError: linear_kd_loss: beta must be in [0, 1], got 1.5.""")
        self.assertExpectedInline(_message(lambda: linear_kd_loss(H, W, teacher_h, teacher_w, T[:3])), """\
ValueError: linear_kd_loss: targets must have the leading shape of hidden (4,), got (3,).""")

    def test_rl_inputs(self):
        h3, ids, mask, adv = torch.randn(2, 3, 8), torch.randint(0, 11, (2, 3)), torch.ones(2, 3), torch.randn(2)
        self.assertExpectedInline(_message(lambda: linear_token_logprobs(H, W, T.float())), """\
TypeError: linear_token_logprobs: token_ids must be an integer tensor of class indices, got torch.float32. Probability targets need the full (N, V) tensor and are not supported.""")
        self.assertExpectedInline(_message(lambda: linear_token_logprobs(H, W, torch.tensor([0, 11, 2, 3]))), """\
ValueError: linear_token_logprobs: token_ids must be in [0, 11), got 11.""")
        self.assertExpectedInline(_message(lambda: linear_grpo_loss(H, W, T, mask, adv)), """\
ValueError: linear_grpo_loss: hidden must have shape (B, T, D), got (4, 8).""")
        self.assertExpectedInline(_message(lambda: linear_grpo_loss(h3, W, ids, mask, adv[:1], beta=0.0)), """\
ValueError: linear_grpo_loss: advantages must have shape (B,) = (2,), one per sequence, got (1,).""")
        self.assertExpectedInline(_message(lambda: linear_grpo_loss(h3, W, ids, mask, adv, beta=0.04)), """\
ValueError: linear_grpo_loss: beta=0.04 needs ref_logprobs for its KL term; pass them, or beta=0.0.""")
        self.assertExpectedInline(_message(lambda: linear_grpo_loss(h3, W, ids, mask, adv, beta=0.0,
                                                                    loss_type="ppo")), """\
ValueError: linear_grpo_loss: loss_type must be one of 'grpo', 'bnpo', 'dr_grpo', 'dapo', got 'ppo'.""")
        self.assertExpectedInline(_message(lambda: linear_grpo_loss(h3, W, ids, mask[:, :2], adv, beta=0.0)), """\
ValueError: linear_grpo_loss: completion_mask must have the leading shape of hidden (2, 3), got (2, 2).""")
        self.assertExpectedInline(_message(lambda: linear_dpo_loss(h3[:1], W, ids[:1], mask[:1], adv[:1])), """\
ValueError: linear_dpo_loss: hidden must hold 2B sequences (B chosen, then B rejected), got 1.""")
        self.assertExpectedInline(_message(lambda: linear_dpo_loss(h3, W, ids, mask, torch.randn(3))), """\
ValueError: linear_dpo_loss: ref_logprobs must have shape (2B,) = (2,) or (2B, T) = (2, 3), got (3,).""")


if __name__ == "__main__":
    expecttest.run_tests()


def test_module_forms_check_keywords_and_show_options():
    from lce_compile import LinearCrossEntropyLoss, LinearDPOLoss, LinearGRPOLoss, LinearTokenLogprobs
    with pytest.raises(TypeError, match="loss_typ"):
        LinearGRPOLoss(loss_typ="dapo")
    with pytest.raises(ValueError, match="loss_type must be one of"):
        LinearGRPOLoss(loss_type="dapoo")
    with pytest.raises(TypeError, match="betta"):
        LinearDPOLoss(betta=0.1)
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        LinearDPOLoss(label_smoothing=0.7)
    assert "loss_type='dapo'" in repr(LinearGRPOLoss(loss_type="dapo"))
    assert "temperature=0.7" in repr(LinearTokenLogprobs(temperature=0.7))
    module = LinearCrossEntropyLoss(class_weight=torch.ones(5), options=FusedOptions(chunk_size=8))
    assert "class_weight=Tensor(5,)" in repr(module) and "chunk_size=8" in repr(module)


def test_meta_device_runs_shapes_only():
    """A meta-device call (shape inference, deferred init) skips the value checks and returns meta results."""
    hidden = torch.randn(10, 4, device="meta", requires_grad=True)
    weight = torch.randn(7, 4, device="meta", requires_grad=True)
    targets = torch.randint(0, 7, (10,), device="meta")
    loss = linear_cross_entropy(hidden, weight, targets)
    loss.backward()
    assert loss.device.type == "meta" and hidden.grad.shape == hidden.shape and weight.grad.shape == weight.shape



@pytest.mark.parametrize("call", [
    lambda h3, ids, mask, adv: linear_grpo_loss(h3, W, ids, mask, adv, beta=0.0, return_stats=True),
    lambda h3, ids, mask, adv: linear_dpo_loss(h3, W, ids, mask, adv, return_stats=True),
    lambda h3, ids, mask, adv: LinearGRPOLoss(return_stats=True)(h3, W, ids, mask, adv),
    lambda h3, ids, mask, adv: LinearDPOLoss(return_stats=True)(h3, W, ids, mask, adv),
    lambda h3, ids, mask, adv: linear_kd_loss(student_hidden=H, student_weight=W, student_bias=torch.zeros(11),
                                              teacher_hidden=torch.randn(4, 6), teacher_weight=torch.randn(11, 6)),
], ids=["grpo_return_stats", "dpo_return_stats", "LinearGRPOLoss_return_stats", "LinearDPOLoss_return_stats",
        "kd_student_keywords"])
def test_deprecation_warnings_name_the_removal_version(call):
    h3, ids, mask, adv = torch.randn(2, 3, 8), torch.randint(0, 11, (2, 3)), torch.ones(2, 3), torch.randn(2)
    with pytest.warns(DeprecationWarning) as record:
        call(h3, ids, mask, adv)
    messages = [str(w.message) for w in record if issubclass(w.category, DeprecationWarning)]
    assert messages and all("0.2.0" in message for message in messages), messages
