"""The RL-side losses over token log-probabilities: ``--loss grpo``, ``--loss dpo`` and ``--loss logprobs``.

GRPO and DPO see the N tokens as sequences of ``SEQUENCE`` completion tokens; the targets' ignored positions
(~10%) are the masked-out tokens, and their other inputs (advantages, reference log-probs) are seeded.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import contextlib
import sys
import types

from .base import IGNORE_INDEX, Family, Method, needs_module, wide_logits

SEQUENCE = 1024  # T, completion tokens per sequence
GRPO_BETA, GRPO_EPSILON = 0.04, 0.2
DPO_BETA = 0.1
ENTROPY_BONUS = 0.01


def _sequences(targets, t):
    """(token_ids, completion_mask), both (N // t, t), from the first N // t * t targets."""
    rows = targets[: targets.shape[0] // t * t].view(-1, t)
    mask = rows != IGNORE_INDEX
    return torch.where(mask, rows, 0), mask


def _token_logprobs(hidden, weight, token_ids):
    """log p(token) (B, T) from full logits of ``hidden`` (B * T, D): the unfused code that the fused log-prob
    primitives replace."""
    logits = wide_logits(hidden, weight).view(*token_ids.shape, -1)
    return logits.log_softmax(-1).gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)


_TRL_VOCAB_TILE = 32768  # TRL 1.16's trainers' chunk_size (trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE)


def _trl_kernel():
    """TRL's chunked log-prob kernel (``trl.kernels``), with a no-op stand-in for the ZeRO-3 gather that its
    backward imports from ``trl.trainer.utils`` (which needs accelerate and datasets; this runs in a worker)."""
    if "trl.trainer.utils" not in sys.modules:
        stub = types.ModuleType("trl.trainer.utils")
        stub.maybe_gather_lm_head_ctx = lambda weight, bias: contextlib.nullcontext()
        sys.modules.setdefault("trl.trainer", types.ModuleType("trl.trainer"))
        sys.modules["trl.trainer.utils"] = stub
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    def logprobs_and_entropy(hidden, weight, token_ids):
        """(log p(token), entropy), both (N,), as TRL's trainers call the kernel (temperature 1, no softcap)."""
        logp, entropy, *_ = ChunkedLogProbFunction.apply(hidden, weight, None, token_ids, 1.0, _TRL_VOCAB_TILE,
                                                         None, 1.0, ("entropy",))
        return logp, entropy
    return logprobs_and_entropy


_trl_unavailable = needs_module("trl", "transformers")


# ---- GRPO: DAPO normalization, token-level ratios, k3 KL to reference log-probs ----

def grpo_rollout(hidden, weight, targets):
    """B = N / SEQUENCE sequences (one of N tokens if N is not a multiple), seeded advantages (B,) and
    reference log-probs (B, T)."""
    n = targets.shape[0]
    ids, mask = _sequences(targets, SEQUENCE if n % SEQUENCE == 0 else n)
    gen = torch.Generator(device=targets.device).manual_seed(4321)
    advantages = torch.randn(ids.shape[0], generator=gen, device=targets.device)
    ref = torch.randn(ids.shape, generator=gen, device=targets.device) - 12  # ~ log(1 / V) for a peaked model
    return {"token_ids": ids, "completion_mask": mask, "advantages": advantages, "ref_logprobs": ref}


def unfused_grpo(hidden, weight, targets, token_ids, completion_mask, advantages, ref_logprobs):
    """The unfused DAPO loss: full (N, V) logits, log-softmax, gather, TRL's per-token formula. Also the
    reference."""
    return _unfused_grpo(hidden, weight, token_ids, completion_mask, advantages, ref_logprobs)


def _unfused_grpo(hidden, weight, ids, mask, advantages, ref):
    return _grpo_objective(_token_logprobs(hidden, weight, ids), mask, advantages, ref)


def _grpo_objective(logp, mask, advantages, ref, beta=GRPO_BETA, epsilon=GRPO_EPSILON):
    ratio = torch.exp(logp - logp.detach())
    adv = advantages.unsqueeze(-1)
    loss = -torch.minimum(ratio * adv, ratio.clamp(1 - epsilon, 1 + epsilon) * adv)
    delta = ref - logp
    loss = loss + beta * (torch.exp(delta) - delta - 1)
    return (loss * mask).sum() / mask.sum().clamp(min=1)


def _make_grpo_compile():
    compiled = torch.compile(_unfused_grpo)

    def compiled_grpo(hidden, weight, targets, token_ids, completion_mask, advantages, ref_logprobs):
        return compiled(hidden, weight, token_ids, completion_mask, advantages, ref_logprobs)
    return compiled_grpo


def _make_grpo_trl():
    kernel = _trl_kernel()

    def trl_grpo(hidden, weight, targets, token_ids, completion_mask, advantages, ref_logprobs):
        logp, _ = kernel(hidden, weight, token_ids.flatten())
        return _grpo_objective(logp.view(token_ids.shape), completion_mask, advantages, ref_logprobs)
    return trl_grpo


def _make_grpo_fused(compile=None, chunk_memory=None):
    from lce_compile import FusedOptions, linear_grpo_loss
    options = FusedOptions(compile=compile, chunk_memory=chunk_memory)

    def fused(hidden, weight, targets, token_ids, completion_mask, advantages, ref_logprobs):
        return linear_grpo_loss(hidden.view(*token_ids.shape, -1), weight, token_ids, completion_mask, advantages,
                                ref_logprobs=ref_logprobs, beta=GRPO_BETA, loss_type="dapo", options=options)
    return fused


GRPO = Family(
    "grpo", f"GRPO (dapo): N tokens as N/{SEQUENCE} sequences of {SEQUENCE} (or one of N), ~10% masked out; "
    f"token-level clipped ratios (epsilon={GRPO_EPSILON}) plus a k3 KL to seeded reference log-probs "
    f"(beta={GRPO_BETA}), the mean over all kept tokens of the batch",
    reference=unfused_grpo, extras=grpo_rollout, methods={
        "eager": Method(lambda: unfused_grpo, "unfused GRPO (dapo): full logits, log_softmax, gather"),
        "compile": Method(_make_grpo_compile, "torch.compile of the unfused GRPO loss", default_on=("cuda",),
                          compiles=True),
        "fused": Method(_make_grpo_fused, "lce_compile.linear_grpo_loss(loss_type='dapo')", compiles=True,
                        make_at=lambda memory: _make_grpo_fused(chunk_memory=memory), lce_compile=True),
        "trl": Method(_make_grpo_trl, "TRL 1.16's chunked log-prob kernel (trl.kernels), then the same per-token "
                      "formula", unavailable=_trl_unavailable, default_on=("cuda",)),
        "fused_compiled": Method(lambda: _make_grpo_fused(True), "lce_compile.linear_grpo_loss(loss_type='dapo'), "
                                 "FusedOptions(compile=True)", default_on=(), compiles=True, lce_compile=True),
    })


# ---- DPO: N tokens as 2B sequences (B chosen, then B rejected), sigmoid loss ----

def dpo_batch(hidden, weight, targets):
    """2B = N / SEQUENCE sequences (two of N / 2 tokens if N is not a multiple of 2 SEQUENCE) and seeded
    reference sequence log-probs (2B,)."""
    n = targets.shape[0]
    ids, mask = _sequences(targets, SEQUENCE if n % (2 * SEQUENCE) == 0 else n // 2)
    gen = torch.Generator(device=targets.device).manual_seed(2468)
    ref = -10.0 * mask.sum(-1) + torch.randn(ids.shape[0], generator=gen, device=targets.device)
    return {"token_ids": ids, "completion_mask": mask, "ref_logprobs": ref}


def unfused_dpo(hidden, weight, targets, token_ids, completion_mask, ref_logprobs):
    """The unfused DPO loss: full logits, log_softmax, gather, sequence sums, -logsigmoid of the margin. Also
    the reference."""
    return _unfused_dpo(hidden, weight, token_ids, completion_mask, ref_logprobs)


def _unfused_dpo(hidden, weight, ids, mask, ref):
    seq = (_token_logprobs(hidden[: ids.numel()], weight, ids) * mask).sum(-1) - ref
    b = ids.shape[0] // 2
    return -F.logsigmoid(DPO_BETA * (seq[:b] - seq[b:])).mean()


def _make_dpo_compile():
    compiled = torch.compile(_unfused_dpo)

    def compiled_dpo(hidden, weight, targets, token_ids, completion_mask, ref_logprobs):
        return compiled(hidden, weight, token_ids, completion_mask, ref_logprobs)
    return compiled_dpo


def _make_dpo_fused(chunk_memory=None):
    from lce_compile import FusedOptions, linear_dpo_loss
    options = FusedOptions(chunk_memory=chunk_memory)

    def fused(hidden, weight, targets, token_ids, completion_mask, ref_logprobs):
        return linear_dpo_loss(hidden[: token_ids.numel()].view(*token_ids.shape, -1), weight, token_ids,
                               completion_mask, ref_logprobs, beta=DPO_BETA, options=options)
    return fused


DPO = Family(
    "dpo", f"DPO (sigmoid): N tokens as 2B sequences of {SEQUENCE} (or two of N/2), B chosen then B rejected; "
    f"-mean logsigmoid(beta * (chosen - rejected)) of the sequences' log-prob sums over kept tokens minus seeded "
    f"reference ones, beta={DPO_BETA}",
    reference=unfused_dpo, extras=dpo_batch, methods={
        "eager": Method(lambda: unfused_dpo, "unfused DPO (sigmoid): full logits, log_softmax, gather"),
        "compile": Method(_make_dpo_compile, "torch.compile of the unfused DPO loss", default_on=("cuda",),
                          compiles=True),
        "fused": Method(_make_dpo_fused, "lce_compile.linear_dpo_loss", compiles=True,
                        make_at=lambda memory: _make_dpo_fused(chunk_memory=memory), lce_compile=True),
    })


# ---- token log-probs: an SFT-style objective with an entropy bonus, so that both outputs get a gradient ----

def unfused_logprobs(hidden, weight, targets):
    """-mean(log p(target)) - 0.01 mean(entropy) over kept tokens: full logits, log_softmax, gather. Also the
    reference."""
    log_p = wide_logits(hidden, weight).log_softmax(-1)
    kept = targets != IGNORE_INDEX
    logp = log_p.gather(-1, torch.where(kept, targets, 0).unsqueeze(-1)).squeeze(-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    return _logprob_objective(logp, entropy, kept)


def _logprob_objective(logp, entropy, kept):
    return -(torch.where(kept, logp + ENTROPY_BONUS * entropy, 0.0)).sum() / kept.sum()


def _make_logprobs_fused(chunk_memory=None):
    from lce_compile import FusedOptions, linear_token_logprobs
    options = FusedOptions(chunk_memory=chunk_memory)

    def fused(hidden, weight, targets):
        kept = targets != IGNORE_INDEX
        logp, entropy = linear_token_logprobs(hidden, weight, torch.where(kept, targets, 0), return_entropy=True,
                                              options=options)
        return _logprob_objective(logp, entropy, kept)
    return fused


def _make_logprobs_trl():
    kernel = _trl_kernel()

    def trl_logprobs(hidden, weight, targets):
        kept = targets != IGNORE_INDEX
        logp, entropy = kernel(hidden, weight, torch.where(kept, targets, 0))
        return _logprob_objective(logp, entropy, kept)
    return trl_logprobs


LOGPROBS = Family(
    "logprobs", f"token log-probs: -mean log p(target) - {ENTROPY_BONUS} mean entropy over kept tokens",
    reference=unfused_logprobs, methods={
        "eager": Method(lambda: unfused_logprobs, "unfused log-probs + entropy: full logits, log_softmax, gather"),
        "compile": Method(lambda: torch.compile(unfused_logprobs), "torch.compile of the unfused log-probs + "
                          "entropy", default_on=("cuda",), compiles=True),
        "fused": Method(_make_logprobs_fused, "lce_compile.linear_token_logprobs(return_entropy=True)",
                        compiles=True, make_at=lambda memory: _make_logprobs_fused(chunk_memory=memory),
                        lce_compile=True),
        "trl": Method(_make_logprobs_trl, "TRL 1.16's chunked log-prob kernel (trl.kernels), entropy requested",
                      unavailable=_trl_unavailable, default_on=("cuda",)),
    })
