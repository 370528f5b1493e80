"""``--loss kd``: knowledge distillation from a teacher twice the student's width, the divergence between the
two heads' token distributions, mean over kept tokens: the forward KL ``KL(teacher || student)`` by default,
the reverse KL and the symmetric JSD as opt-in methods."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .base import IGNORE_INDEX, Family, Method, needs_module, wide_logits

TEACHER_WIDTH = 2  # teacher D = 2 x student D (e.g. Qwen-style 2048 -> 4096)
KINDS = {"forward_kl": "", "reverse_kl": "_reverse_kl", "jsd": "_jsd"}  # kind -> method name suffix
_LIGER_JSD_BETA = {"forward_kl": 0.0, "reverse_kl": 1.0, "jsd": 0.5}  # Liger's beta: 0 forward KL, 1 reverse


def teacher(hidden, weight, targets):
    """Seeded teacher inputs for the student's N tokens: hidden (N, 2D) and weight (V, 2D), logit std ~4, bf16
    values (so that an fp32/fp64 reference sees exactly what a bf16 method sees) in the student's dtype."""
    (n, d), v = hidden.shape, weight.shape[0]
    gen = torch.Generator(device=hidden.device).manual_seed(1234)
    dt = TEACHER_WIDTH * d
    t_hidden = torch.randn(n, dt, generator=gen, device=hidden.device).bfloat16()
    t_weight = (torch.randn(v, dt, generator=gen, device=hidden.device) * (4 / dt ** 0.5)).bfloat16()
    # cast here, an input: until 2026-12-05 the cast ran inside the step, which in fp32 added a copy of the
    # teacher weight (64 MiB for kd-cpu, 2x its floor) to every method's time and peak
    return {"teacher_hidden": t_hidden.to(hidden.dtype), "teacher_weight": t_weight.to(hidden.dtype)}


def unfused_kd(hidden, weight, targets, teacher_hidden, teacher_weight, kind="forward_kl"):
    """The distillation loss per token, mean over kept tokens: full (N, V) logits of both heads, written in
    probability space (the JSD through its mixture's probabilities). Also the reference."""
    return _unfused_kd(hidden, weight, teacher_hidden, teacher_weight, targets, kind)


def _unfused_kd(hidden, weight, t_hidden, t_weight, targets, kind="forward_kl"):
    log_s = F.log_softmax(wide_logits(hidden, weight), -1)
    log_t = F.log_softmax(wide_logits(t_hidden, t_weight), -1)
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


def _make_compile(kind):
    compiled = torch.compile(functools.partial(_unfused_kd, kind=kind))

    def compiled_kd(hidden, weight, targets, teacher_hidden, teacher_weight):
        return compiled(hidden, weight, teacher_hidden, teacher_weight, targets)
    return compiled_kd


def _make_fused(kind, compile=None, chunk_memory=None):
    from lce_compile import FusedOptions, linear_kd_loss
    options = FusedOptions(compile=compile, chunk_memory=chunk_memory)

    def fused(hidden, weight, targets, teacher_hidden, teacher_weight):
        return linear_kd_loss(hidden, weight, teacher_hidden, teacher_weight, targets, kind=kind,
                              ignore_index=IGNORE_INDEX, options=options)
    return fused


def _sweep_fused(kind, chunk_memory):
    return _make_fused(kind, chunk_memory=chunk_memory)


def _make_liger(kind):
    from liger_kernel.transformers import LigerFusedLinearJSD
    module = LigerFusedLinearJSD(jsd_beta=_LIGER_JSD_BETA[kind], ignore_index=IGNORE_INDEX)

    def liger(hidden, weight, targets, teacher_hidden, teacher_weight):
        return module(hidden, weight, teacher_hidden, teacher_weight, targets)
    return liger


def _kind_methods(kind):
    """compile, fused and liger for one kind; by default the forward KL's (fused on both devices, its peers on
    CUDA), the other kinds by name or with --methods all."""
    suffix = KINDS[kind]
    # the forward KL is the family's own reference: one reference computation for all its methods
    reference = None if kind == "forward_kl" else functools.partial(unfused_kd, kind=kind)
    fused_on, peers_on = (("cpu", "cuda"), ("cuda",)) if kind == "forward_kl" else ((), ())
    return {
        "compile" + suffix: Method(functools.partial(_make_compile, kind), f"torch.compile of the unfused {kind}",
                                   default_on=peers_on, compiles=True, reference=reference),
        "fused" + suffix: Method(functools.partial(_make_fused, kind), f"lce_compile.linear_kd_loss(kind='{kind}')",
                                 default_on=fused_on, compiles=True, reference=reference,
                                 make_at=functools.partial(_sweep_fused, kind), lce_compile=True),
        "liger" + suffix: Method(functools.partial(_make_liger, kind),
                                 f"liger_kernel LigerFusedLinearJSD(jsd_beta={_LIGER_JSD_BETA[kind]}), {kind}",
                                 unavailable=needs_module("liger_kernel"), default_on=peers_on, reference=reference),
    }


METHODS = {
    "eager": Method(lambda: unfused_kd, "unfused forward KL: both heads' full logits"),
    "fused_compiled": Method(functools.partial(_make_fused, "forward_kl", True),
                             "lce_compile.linear_kd_loss(kind='forward_kl'), FusedOptions(compile=True)",
                             default_on=(), compiles=True, lce_compile=True),
}
for _kind in KINDS:
    METHODS.update(_kind_methods(_kind))

KD = Family("kd", f"distillation: forward KL to a teacher {TEACHER_WIDTH}x as wide as the student (D), mean over "
            "kept tokens; the floor is the student's gradients (reverse KL and JSD: --methods all or by name)",
            reference=unfused_kd, methods=METHODS, extras=teacher, buffers=2)
