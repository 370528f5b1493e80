"""The methods the benchmark compares: a registry of ``name -> Method``.

Every method builds a loss function ``fn(hidden (N, D), weight (V, D), targets (N,)) -> scalar``; within one
family (``LOSSES[name]``: cross-entropy, distillation, GRPO, DPO, token log-probs) every method computes the
same quantity (for cross-entropy: the mean over the kept tokens, ``ignore_index=-100``), named by its
``loss``. To add a method (say a lean ``FusedOptions``), add an entry to the family's table; to add a loss,
add its reference to ``REFERENCES`` and point the new methods' ``loss`` at it.

References are the unfused formulas (full logits), evaluated in fp64 on the CPU and in fp32 without TF32 on
CUDA, each through the same ``fn(hidden, weight, targets) -> scalar`` as the methods; the cross-entropy ones
may also run in row chunks (``CHUNKABLE_REFERENCES``), as sums.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
from typing import Callable, Optional

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def unfused_cross_entropy(hidden, weight, targets):
    """The unfused code every fused method replaces: full (N, V) logits, upcast to fp32."""
    return F.cross_entropy((hidden @ weight.T).float(), targets, ignore_index=IGNORE_INDEX)


SOFTCAP, Z_LOSS = 30.0, 1e-4  # the fused_softcap method's settings (Gemma-2 caps its logits at 30)


def _reference_cross_entropy(hidden, weight, targets, reduction="mean", softcap=None, z_loss=0.0):
    # Promote rather than .float(), so that fp64 inputs give an fp64 reference.
    logits = hidden @ weight.T
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    loss = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="none")
    if z_loss:
        loss = loss + z_loss * logits.logsumexp(-1).square() * (targets != IGNORE_INDEX)
    return loss.sum() / (targets != IGNORE_INDEX).sum() if reduction == "mean" else loss.sum()


# loss name -> fn(hidden, weight, targets, reduction="mean" | "sum"), evaluated in fp64 (CPU) or fp32 in
# row chunks (CUDA) as the error reference. "sum" lets the reference run in chunks: mean = sum / kept.
REFERENCES = {
    "cross_entropy": _reference_cross_entropy,
    "cross_entropy_softcap": functools.partial(_reference_cross_entropy, softcap=SOFTCAP, z_loss=Z_LOSS),
}


@dataclasses.dataclass(frozen=True)
class Method:
    """One benchmarked implementation.

    make: () -> loss fn; called in the worker process, so imports of optional packages happen there.
    unavailable: device type -> None if the method can run there, else a one-line reason.
    default_on: device types where it runs when ``--methods`` is not given.
    compiles: it compiles at its first full-size call on every device, so warm-up must be full-size
        (a tiny warm-up would leave the compilation inside the measured run).
    """

    make: Callable[[], Callable]
    doc: str
    unavailable: Callable[[str], Optional[str]] = lambda device: None
    default_on: tuple = ("cpu", "cuda")
    compiles: bool = False
    loss: str = "cross_entropy"


def _needs_module(module: str, device_types=("cuda",)):
    """``unavailable`` for a method from an optional package that runs on ``device_types`` only."""
    def check(device):
        if device not in device_types:
            return f"runs on {'/'.join(device_types)} only"
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed"
        return None
    return check


def _torch_lce_unavailable(device):
    if not hasattr(F, "linear_cross_entropy") or not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        return f"needs torch >= 2.13 (F.linear_cross_entropy with options=), this is {torch.__version__}"
    return None


def _make_compile():
    return torch.compile(unfused_cross_entropy)


def _make_fused():
    from lce_compile import linear_cross_entropy
    return functools.partial(linear_cross_entropy, ignore_index=IGNORE_INDEX)


def _make_fused_lean():
    from lce_compile import FusedOptions, linear_cross_entropy
    return functools.partial(linear_cross_entropy, ignore_index=IGNORE_INDEX,
                             options=FusedOptions(chunk_memory=0.1))


def _make_fused_compiled():
    from lce_compile import FusedOptions, linear_cross_entropy
    return functools.partial(linear_cross_entropy, ignore_index=IGNORE_INDEX, options=FusedOptions(compile=True))


def _make_fused_softcap():
    from lce_compile import linear_cross_entropy
    return functools.partial(linear_cross_entropy, ignore_index=IGNORE_INDEX, softcap=SOFTCAP, z_loss=Z_LOSS)


def _make_fused_generic():
    # F.cross_entropy is one of fused_loss's known functions: its "mean" is PyTorch's global mean.
    from lce_compile import fused_loss
    return functools.partial(fused_loss(F.cross_entropy), ignore_index=IGNORE_INDEX)


def _make_fused_generic_matmul_dtype():
    # the same with bf16 logits handed to F.cross_entropy (the pre-upcast behaviour): a bf16 loss
    from lce_compile import fused_loss
    return functools.partial(fused_loss(F.cross_entropy, upcast=False), ignore_index=IGNORE_INDEX)


def _make_torch_lce():
    # options=LinearCrossEntropyOptions() opts into PyTorch's chunked path; options=None is unfused.
    return functools.partial(F.linear_cross_entropy, ignore_index=IGNORE_INDEX,
                             options=torch.nn.LinearCrossEntropyOptions())


def _make_liger():
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    module = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX)

    def liger(hidden, weight, targets):
        out = module(weight, hidden, targets)  # Liger's order: (lin_weight, input, target)
        return out[0] if isinstance(out, tuple) else out  # some versions return (loss, z_loss)
    return liger


def _make_cce():
    from cut_cross_entropy import linear_cross_entropy
    return functools.partial(linear_cross_entropy, ignore_index=IGNORE_INDEX, reduction="mean")


METHODS = {
    "eager": Method(lambda: unfused_cross_entropy, "unfused: F.cross_entropy((hidden @ weight.T).float(), targets)"),
    # CPU opt-in: Inductor's C++ build takes minutes per shape there.
    "compile": Method(_make_compile, "torch.compile of the unfused code", default_on=("cuda",), compiles=True),
    # lce_compile compiles its chunk functions on CUDA, and on the CPU for large calls
    "fused": Method(_make_fused, "lce_compile.linear_cross_entropy, default options", compiles=True),
    "fused_compiled": Method(_make_fused_compiled, "lce_compile.linear_cross_entropy, FusedOptions(compile=True)",
                             default_on=(), compiles=True),
    "fused_lean": Method(_make_fused_lean, "lce_compile.linear_cross_entropy, FusedOptions(chunk_memory=0.1)",
                         default_on=("cuda",), compiles=True),
    "fused_softcap": Method(_make_fused_softcap, f"lce_compile.linear_cross_entropy, softcap={SOFTCAP}, "
                            f"z_loss={Z_LOSS}", default_on=(), compiles=True, loss="cross_entropy_softcap"),
    "fused_generic": Method(_make_fused_generic, "lce_compile.fused_loss(F.cross_entropy)", default_on=("cuda",),
                            compiles=True),
    "fused_generic_matmul_dtype": Method(_make_fused_generic_matmul_dtype,
                                         "lce_compile.fused_loss(F.cross_entropy, upcast=False)", default_on=(),
                                         compiles=True),
    # opt-in on the CPU, where one cpu-large step takes as long as eager's: the default run stays < 2 min
    "torch_lce": Method(_make_torch_lce, "F.linear_cross_entropy(..., options=LinearCrossEntropyOptions())",
                        unavailable=_torch_lce_unavailable, default_on=("cuda",)),
    "liger": Method(_make_liger, "liger_kernel LigerFusedLinearCrossEntropyLoss",
                    unavailable=_needs_module("liger_kernel"), default_on=("cuda",)),
    "cce": Method(_make_cce, "cut_cross_entropy.linear_cross_entropy",
                  unavailable=_needs_module("cut_cross_entropy"), default_on=("cuda",)),
}


# ---- knowledge distillation (--loss kd): forward KL from a teacher twice the student's width ----
TEACHER_WIDTH = 2  # teacher D = 2 x student D (e.g. Qwen-style 2048 -> 4096)
_TEACHERS: dict = {}


def kd_teacher(n, v, d, device):
    """Seeded teacher inputs for N tokens: hidden (N, 2D) and weight (V, 2D), logit std ~4, as bf16-exact
    values (so an fp32/fp64 reference sees exactly what a bf16 method sees). Cached: one entry."""
    key = (n, v, d, str(device))
    if key not in _TEACHERS:
        _TEACHERS.clear()
        gen = torch.Generator(device=device).manual_seed(1234)
        dt = TEACHER_WIDTH * d
        hidden = torch.randn(n, dt, generator=gen, device=device).bfloat16()
        weight = (torch.randn(v, dt, generator=gen, device=device) * (4 / dt ** 0.5)).bfloat16()
        _TEACHERS[key] = (hidden, weight)
    return _TEACHERS[key]


def _teacher_for(hidden, weight):
    t_hidden, t_weight = kd_teacher(hidden.shape[0], weight.shape[0], hidden.shape[1], hidden.device)
    return t_hidden.to(hidden.dtype), t_weight.to(hidden.dtype)


def unfused_kd(hidden, weight, targets, kind="forward_kl"):
    """The distillation loss per token, mean over kept tokens: full (N, V) logits of both heads, written in
    probability space (the JSD through its mixture's probabilities)."""
    return _unfused_kd(hidden, weight, *_teacher_for(hidden, weight), targets, kind)


def _unfused_kd(hidden, weight, t_hidden, t_weight, targets, kind="forward_kl"):
    wide = torch.promote_types(hidden.dtype, torch.float32)
    log_s = F.log_softmax((hidden @ weight.T).to(wide), -1)
    log_t = F.log_softmax((t_hidden @ t_weight.T).to(wide), -1)
    if kind == "forward_kl":
        rows = (log_t.exp() * (log_t - log_s)).sum(-1)
    elif kind == "reverse_kl":
        rows = (log_s.exp() * (log_s - log_t)).sum(-1)
    else:  # symmetric JSD: m = (p_s + p_t) / 2
        p_s, p_t = log_s.exp(), log_t.exp()
        log_m = ((p_s + p_t) / 2).log()
        rows = 0.5 * (p_t * (log_t - log_m)).sum(-1) + 0.5 * (p_s * (log_s - log_m)).sum(-1)
    kept = targets != IGNORE_INDEX
    return torch.where(kept, rows, 0.0).sum() / kept.sum()


def _make_kd_compile(kind):
    compiled = torch.compile(functools.partial(_unfused_kd, kind=kind))  # teacher inputs made outside it
    return lambda hidden, weight, targets: compiled(hidden, weight, *_teacher_for(hidden, weight), targets)


def _make_kd_fused(kind, compile=None):
    from lce_compile import FusedOptions, linear_kd_loss
    options = FusedOptions(compile=compile)

    def fused(hidden, weight, targets):
        t_hidden, t_weight = _teacher_for(hidden, weight)
        return linear_kd_loss(hidden, weight, t_hidden, t_weight, targets, kind=kind, ignore_index=IGNORE_INDEX,
                              options=options)
    return fused


_LIGER_JSD_BETA = {"forward_kl": 0.0, "reverse_kl": 1.0, "jsd": 0.5}  # Liger's beta: 0 forward KL, 1 reverse


def _make_kd_liger(kind):
    from liger_kernel.transformers import LigerFusedLinearJSD
    module = LigerFusedLinearJSD(jsd_beta=_LIGER_JSD_BETA[kind], ignore_index=IGNORE_INDEX)

    def liger(hidden, weight, targets):
        t_hidden, t_weight = _teacher_for(hidden, weight)
        return module(hidden, weight, t_hidden, t_weight, targets)
    return liger


KD_METHODS = {"eager": Method(lambda: unfused_kd, "unfused forward KL: both heads' full logits", loss="kd"),
              "fused_compiled": Method(functools.partial(_make_kd_fused, "forward_kl", True),
                                       "lce_compile.linear_kd_loss(kind='forward_kl'), FusedOptions(compile=True)",
                                       default_on=(), compiles=True, loss="kd")}
for _kind, _suffix in (("forward_kl", ""), ("reverse_kl", "_reverse_kl"), ("jsd", "_jsd")):
    _loss = "kd" + _suffix
    REFERENCES[_loss] = functools.partial(unfused_kd, kind=_kind)
    # by default: forward KL (fused on both devices, its peers on CUDA); the other kinds by name or --methods all
    _fused_on, _peers_on = (("cpu", "cuda"), ("cuda",)) if _kind == "forward_kl" else ((), ())
    KD_METHODS.update({
        "compile" + _suffix: Method(functools.partial(_make_kd_compile, _kind), f"torch.compile of the unfused {_kind}",
                                    default_on=_peers_on, compiles=True, loss=_loss),
        "fused" + _suffix: Method(functools.partial(_make_kd_fused, _kind), f"lce_compile.linear_kd_loss(kind='{_kind}')",
                                  default_on=_fused_on, compiles=True, loss=_loss),
        "liger" + _suffix: Method(functools.partial(_make_kd_liger, _kind),
                                  f"liger_kernel LigerFusedLinearJSD(jsd_beta={_LIGER_JSD_BETA[_kind]}), {_kind}",
                                  unavailable=_needs_module("liger_kernel"), default_on=_peers_on, loss=_loss),
    })
LOSSES = {"ce": METHODS, "kd": KD_METHODS}


# ---- GRPO (--loss grpo): DAPO normalization, token-level ratios, k3 KL to reference log-probs ----
GRPO_SEQUENCE = 1024  # T; the N tokens are B = N / T sequences (one sequence of N tokens if N < T)
_ROLLOUTS: dict = {}


def grpo_rollout(targets):
    """(token_ids, completion_mask, advantages, ref_logprobs) for a batch: the targets' ignored positions
    (~10%) are the masked-out tokens; seeded advantages (B,) and reference log-probs (B, T). Cached."""
    n = targets.shape[0]
    t = GRPO_SEQUENCE if n % GRPO_SEQUENCE == 0 else n
    key = (n, str(targets.device))
    if key not in _ROLLOUTS:
        _ROLLOUTS.clear()
        gen = torch.Generator(device=targets.device).manual_seed(4321)
        mask = (targets != IGNORE_INDEX).view(n // t, t)
        ids = torch.where(mask, targets.view(n // t, t), 0)
        advantages = torch.randn(n // t, generator=gen, device=targets.device)
        ref = torch.randn(n // t, t, generator=gen, device=targets.device) - 12  # ~ log(1 / V) for a peaked model
        _ROLLOUTS[key] = (ids, mask, advantages, ref)
    return _ROLLOUTS[key]


def unfused_grpo(hidden, weight, targets, beta=0.04, epsilon=0.2):
    """The unfused DAPO loss: full (N, V) logits, log-softmax, gather, TRL's per-token formula."""
    ids, mask, advantages, ref = grpo_rollout(targets)
    return _unfused_grpo(hidden, weight, ids, mask, advantages, ref, beta, epsilon)


def _unfused_grpo(hidden, weight, ids, mask, advantages, ref, beta=0.04, epsilon=0.2):
    b, t = ids.shape
    logits = (hidden @ weight.T).to(torch.promote_types(hidden.dtype, torch.float32)).view(b, t, -1)
    logp = logits.log_softmax(-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    ratio = torch.exp(logp - logp.detach())
    adv = advantages.unsqueeze(-1)
    loss = -torch.minimum(ratio * adv, ratio.clamp(1 - epsilon, 1 + epsilon) * adv)
    delta = ref - logp
    loss = loss + beta * (torch.exp(delta) - delta - 1)
    return (loss * mask).sum() / mask.sum().clamp(min=1)


def _make_grpo_compile():
    compiled = torch.compile(_unfused_grpo)  # the rollout tensors are made outside the compiled code
    return lambda hidden, weight, targets: compiled(hidden, weight, *grpo_rollout(targets))


def _make_grpo_fused(compile=None):
    from lce_compile import FusedOptions, linear_grpo_loss
    options = FusedOptions(compile=compile)

    def fused(hidden, weight, targets):
        ids, mask, advantages, ref = grpo_rollout(targets)
        return linear_grpo_loss(hidden.view(*ids.shape, -1), weight, ids, mask, advantages, ref_logprobs=ref,
                                beta=0.04, loss_type="dapo", options=options)
    return fused


GRPO_METHODS = {
    "eager": Method(lambda: unfused_grpo, "unfused GRPO (dapo): full logits, log_softmax, gather", loss="grpo"),
    "compile": Method(_make_grpo_compile, "torch.compile of the unfused GRPO loss", default_on=("cuda",),
                      compiles=True, loss="grpo"),
    "fused": Method(_make_grpo_fused, "lce_compile.linear_grpo_loss(loss_type='dapo')", compiles=True, loss="grpo"),
    "fused_compiled": Method(functools.partial(_make_grpo_fused, True), "lce_compile.linear_grpo_loss(loss_type='dapo'), "
                             "FusedOptions(compile=True)", default_on=(), compiles=True, loss="grpo"),
}
REFERENCES["grpo"] = unfused_grpo
LOSSES["grpo"] = GRPO_METHODS


# ---- DPO (--loss dpo): N tokens as 2B sequences (B chosen, then B rejected), sigmoid loss, beta 0.1 ----
DPO_BETA = 0.1


def dpo_batch(targets):
    """(token_ids (2B, T), completion_mask, ref sequence log-probs (2B,)): N / 1024 sequences of 1024 tokens
    (two of N / 2 if fewer), the targets' ignored positions masked out. Cached."""
    n = targets.shape[0]
    t = GRPO_SEQUENCE if n % (2 * GRPO_SEQUENCE) == 0 else n // 2
    key = ("dpo", n, str(targets.device))
    if key not in _ROLLOUTS:
        _ROLLOUTS.clear()
        gen = torch.Generator(device=targets.device).manual_seed(2468)
        kept = (targets[: n // t * t] != IGNORE_INDEX).view(n // t, t)
        ids = torch.where(kept, targets[: n // t * t].view(n // t, t), 0)
        ref = -10.0 * kept.sum(-1) + torch.randn(n // t, generator=gen, device=targets.device)
        _ROLLOUTS[key] = (ids, kept, ref)
    return _ROLLOUTS[key]


def unfused_dpo(hidden, weight, targets):
    """The unfused DPO loss: full logits, log_softmax, gather, sequence sums, -logsigmoid of the margin."""
    return _unfused_dpo(hidden, weight, *dpo_batch(targets))


def _unfused_dpo(hidden, weight, ids, mask, ref):
    b2, t = ids.shape
    logits = (hidden[: b2 * t] @ weight.T).to(torch.promote_types(hidden.dtype, torch.float32)).view(b2, t, -1)
    logp = logits.log_softmax(-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    seq = (logp * mask).sum(-1) - ref
    margin = DPO_BETA * (seq[: b2 // 2] - seq[b2 // 2:])
    return -F.logsigmoid(margin).mean()


def _make_dpo_compile():
    compiled = torch.compile(_unfused_dpo)
    return lambda hidden, weight, targets: compiled(hidden, weight, *dpo_batch(targets))


def _make_dpo_fused():
    from lce_compile import linear_dpo_loss

    def fused(hidden, weight, targets):
        ids, mask, ref = dpo_batch(targets)
        return linear_dpo_loss(hidden[: ids.numel()].view(*ids.shape, -1), weight, ids, mask, ref, beta=DPO_BETA)
    return fused


LOSSES["dpo"] = {
    "eager": Method(lambda: unfused_dpo, "unfused DPO (sigmoid): full logits, log_softmax, gather", loss="dpo"),
    "compile": Method(_make_dpo_compile, "torch.compile of the unfused DPO loss", default_on=("cuda",),
                      compiles=True, loss="dpo"),
    "fused": Method(_make_dpo_fused, "lce_compile.linear_dpo_loss", compiles=True, loss="dpo"),
}
REFERENCES["dpo"] = unfused_dpo


# ---- token log-probs (--loss logprobs): an SFT-style objective with an entropy bonus over both outputs ----
ENTROPY_BONUS = 0.01


def unfused_logprobs(hidden, weight, targets):
    """-mean(log p(target)) - 0.01 mean(entropy) over kept tokens: full logits, log_softmax, gather."""
    logits = (hidden @ weight.T).to(torch.promote_types(hidden.dtype, torch.float32))
    log_p = logits.log_softmax(-1)
    kept = targets != IGNORE_INDEX
    logp = log_p.gather(-1, torch.where(kept, targets, 0).unsqueeze(-1)).squeeze(-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    return _logprob_objective(logp, entropy, kept)


def _logprob_objective(logp, entropy, kept):
    return -(torch.where(kept, logp + ENTROPY_BONUS * entropy, 0.0)).sum() / kept.sum()


def _make_logprobs_compile():
    return torch.compile(unfused_logprobs)


def _make_logprobs_fused():
    from lce_compile import linear_token_logprobs

    def fused(hidden, weight, targets):
        kept = targets != IGNORE_INDEX
        logp, entropy = linear_token_logprobs(hidden, weight, torch.where(kept, targets, 0), return_entropy=True)
        return _logprob_objective(logp, entropy, kept)
    return fused


LOSSES["logprobs"] = {
    "eager": Method(lambda: unfused_logprobs, "unfused log-probs + entropy: full logits, log_softmax, gather",
                    loss="logprobs"),
    "compile": Method(_make_logprobs_compile, "torch.compile of the unfused log-probs + entropy",
                      default_on=("cuda",), compiles=True, loss="logprobs"),
    "fused": Method(_make_logprobs_fused, "lce_compile.linear_token_logprobs(return_entropy=True)", compiles=True,
                    loss="logprobs"),
}
REFERENCES["logprobs"] = unfused_logprobs

# references that may run a few thousand rows at a time, as sums (the others are not sums over rows)
CHUNKABLE_REFERENCES = {"cross_entropy", "cross_entropy_softcap"}
