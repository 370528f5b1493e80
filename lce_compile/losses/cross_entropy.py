"""Fused linear cross-entropy: softcap, z-loss, label smoothing, class weights, bias, per-token stats."""
from __future__ import annotations

import functools

import torch
from torch import nn

from .. import checks
from ..policy import FusedOptions
from ..wrap import fused_call
from ._aux import AuxOutput, AuxRequest, aux_keys as requested_aux
from ._rows import ce_rows, check_transform, kept_row_weight

_NAME = "linear_cross_entropy"
_AUX = ("loss", "lse", "correct")  # the AuxRequest fields cross-entropy gives


def linear_cross_entropy(hidden, weight, targets, *, bias=None, class_weight=None, ignore_index: int = -100,
                         label_smoothing: float = 0.0, logit_scale: float = 1.0, softcap: float | None = None,
                         z_loss: float = 0.0, reduction: str = "mean", return_aux: AuxRequest | None = None,
                         options: FusedOptions | None = None):
    r"""Cross-entropy of ``hidden @ weight.T`` against ``targets``, without materializing the logits.

    Same value and gradients, up to float rounding, as the unfused code::

        logits = (hidden @ weight.T + bias).float()          # (..., V); bias if given
        logits = logits * logit_scale                        # if logit_scale != 1
        logits = softcap * torch.tanh(logits / softcap)      # if softcap is not None
        loss = F.cross_entropy(logits.flatten(0, -2), targets.flatten(), weight=class_weight,
                               ignore_index=ignore_index, label_smoothing=label_smoothing, reduction="none")
        kept = targets.flatten() != ignore_index
        z_term = z_loss * logits.logsumexp(-1).flatten() ** 2 * kept
        # "mean": loss.sum() / (class_weight[targets] over kept tokens).sum() + z_term.sum() / kept.sum()
        #   (the cross-entropy's denominator is the count of kept tokens without class_weight; the z-loss, a
        #   per-token regulariser, is a mean over kept tokens whatever the class weights),
        # "sum": (loss + z_term).sum(), "none": (loss + z_term).view(targets.shape)

    Args:
        hidden (Tensor): ``(..., D)`` final hidden states; fp32, bf16 or fp16.
        weight (Tensor): ``(V, D)`` output layer, e.g. ``model.lm_head.weight``; or split over the vocabulary
            across ranks (a ``Shard(0)`` DTensor beside a DTensor ``hidden``, or a ``VocabShard``:
            docs/distributed.md).
        targets (Tensor): ``(...)`` integer class indices in ``[0, V)`` or ``ignore_index``.
        bias (Tensor, optional): ``(V,)`` output-layer bias.
        class_weight (Tensor, optional): ``(V,)`` per-class weights, as ``F.cross_entropy``'s ``weight``.
        ignore_index (int): targets equal to it contribute 0 and leave the mean. Default: ``-100``.
        label_smoothing (float): as in ``F.cross_entropy``. Default: ``0.0``.
        logit_scale (float): multiplies the fp32 logits first (Cohere's ``logit_scale``; Granite's
            ``1 / logits_scaling``). Default: ``1.0``.
        softcap (float, optional): Gemma 2's logit soft-capping ``softcap * tanh(logits / softcap)``.
        z_loss (float): PaLM's auxiliary ``z_loss * logsumexp(logits) ** 2`` per kept token. Default: ``0.0``.
        reduction (str): ``"mean"`` (global mean over kept tokens) | ``"sum"`` | ``"none"``. Default: ``"mean"``.
        return_aux (AuxRequest, optional): per-token outputs to return too.
        options (FusedOptions, optional): engine knobs (chunk size, compile, validation).
    Returns:
        Tensor: an fp32 scalar, or ``targets.shape`` for ``"none"``; ``(loss, AuxOutput)`` when ``return_aux``
        is set.
    Memory: the gradients plus one ``(C, V)`` chunk; never ``(N, V)``, on any device.

    .. note::
        Target values are checked (``ValueError``) before the chunk loop, at the cost of one read-back;
        inside ``torch.compile`` or with ``FusedOptions(validate=False)`` they are not.
    """
    _check_options(label_smoothing, logit_scale, softcap, z_loss, return_aux)
    aux_keys = requested_aux(_NAME, return_aux, _AUX)
    static = {"ignore_index": ignore_index, "label_smoothing": float(label_smoothing), "logit_scale": logit_scale,
              "softcap": softcap, "z_loss": float(z_loss), "aux_keys": aux_keys}
    z_scale = None
    if z_loss and class_weight is not None and reduction == "mean":
        # the z-loss's mean is over kept tokens, the cross-entropy's over their class weights: one denominator
        # (the latter) for both, the z-term scaled by their ratio
        z_scale = functools.partial(_z_scale, ignore_index)
    out = fused_call(_NAME, ce_rows, hidden, weight, bias, targets=targets, ignore_index=ignore_index,
                     class_weight=class_weight, static=static, reduction=reduction, aux_keys=aux_keys,
                     options=options, local_tensors=z_scale)
    if return_aux is None:
        return out
    loss, aux = out if aux_keys else (out, {})
    return loss, AuxOutput(**aux)


def _z_scale(ignore_index, targets, class_weight):
    """``{"z_scale": (summed class weights of the kept tokens) / (their count)}``; 0 without kept tokens (the loss
    is NaN then, and its gradients 0)."""
    count = (targets != ignore_index).sum()
    weights = kept_row_weight(targets, ignore_index, class_weight).sum()
    return {"z_scale": torch.where(count > 0, weights / count.clamp(min=1), 0.0)}


def _check_options(label_smoothing, logit_scale, softcap, z_loss, return_aux):
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{_NAME}: label_smoothing must be in [0, 1], got {label_smoothing!r}.")
    check_transform(_NAME, logit_scale, softcap)
    if not z_loss >= 0:
        raise ValueError(f"{_NAME}: z_loss must be >= 0, got {z_loss!r}.")
    requested_aux(_NAME, return_aux, _AUX)


class LinearCrossEntropyLoss(nn.Module):
    """:func:`linear_cross_entropy` as a module; ``forward(hidden, weight, targets, bias=None)``.

    The model keeps its head, so the head's weight (and bias) are passed to ``forward``; every keyword of
    :func:`linear_cross_entropy` is set once here. ``class_weight`` is registered as a buffer.
    """

    def __init__(self, *, class_weight=None, ignore_index: int = -100, label_smoothing: float = 0.0,
                 logit_scale: float = 1.0, softcap: float | None = None, z_loss: float = 0.0, reduction: str = "mean",
                 return_aux: AuxRequest | None = None, options: FusedOptions | None = None):
        super().__init__()
        checks.check_reduction(type(self).__name__, reduction)
        _check_options(label_smoothing, logit_scale, softcap, z_loss, return_aux)
        self.register_buffer("class_weight", class_weight)
        self.ignore_index, self.label_smoothing, self.logit_scale, self.softcap, self.z_loss = (
            ignore_index, label_smoothing, logit_scale, softcap, z_loss)
        self.reduction, self.return_aux, self.options = reduction, return_aux, options

    def forward(self, hidden, weight, targets, bias=None):
        return linear_cross_entropy(
            hidden, weight, targets, bias=bias, class_weight=self.class_weight, ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing, logit_scale=self.logit_scale, softcap=self.softcap,
            z_loss=self.z_loss, reduction=self.reduction, return_aux=self.return_aux, options=self.options)

    def extra_repr(self):
        weights = "None" if self.class_weight is None else f"Tensor{tuple(self.class_weight.shape)}"
        return (f"class_weight={weights}, ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing}, "
                f"logit_scale={self.logit_scale}, softcap={self.softcap}, z_loss={self.z_loss}, "
                f"reduction={self.reduction!r}, return_aux={self.return_aux!r}, options={self.options!r}")
