"""A loss written for full logits, fused with ``@fused_loss``: same value and gradients, no (N, V) logits.

Run: python examples/custom_loss.py   (exits non-zero if fused and unfused disagree beyond fp32 rounding)
"""
import torch
import torch.nn.functional as F

from lce_compile import FusedOptions, fused_loss


@fused_loss  # returns="rows": one value per row
def focal_loss(logits, targets, *, gamma=2.0, ignore_index=-100):
    """Focal loss (Lin et al. 2017) per token, -(1 - p_t) ** gamma * log p_t; 0 for ignored tokens."""
    kept = targets != ignore_index
    logp_t = logits.float().log_softmax(-1).gather(1, torch.where(kept, targets, 0)[:, None])[:, 0]
    return -(1 - logp_t.exp()) ** gamma * logp_t * kept


@fused_loss(returns="mean", mean_over=lambda targets: targets != -100)
def penalized_ce(logits, targets, *, beta=0.1):
    """Cross-entropy minus beta * entropy (confidence penalty), a mean over the kept tokens."""
    logp = logits.float().log_softmax(-1)
    kept = targets != -100
    ce = F.cross_entropy(logp, targets, reduction="none")  # 0 for ignored tokens
    entropy = -(logp.exp() * logp).sum(-1)
    return ((ce - beta * entropy) * kept).sum() / kept.sum()


def loss_and_grads(loss_fn, hidden, weight, targets, **kwargs):
    hidden, weight = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    loss = loss_fn(hidden, weight, targets, **kwargs)
    loss.sum().backward()
    return loss.detach(), hidden.grad, weight.grad


def unfused(fused):
    return lambda hidden, weight, targets: fused.__wrapped__(hidden.flatten(0, -2) @ weight.T, targets.flatten())


torch.manual_seed(0)
N, D, V = 3 * 101, 64, 1009                              # ragged N, prime V
hidden, weight = torch.randn(3, 101, D), torch.randn(V, D) / D ** 0.5 * 4
targets = torch.randint(0, V, (3, 101))
targets[torch.rand(3, 101) < 0.1] = -100                 # 10% ignored tokens
options = FusedOptions(chunk_size=64)                    # several chunks, the last one ragged

for loss_fn in (focal_loss, penalized_ce):
    got = loss_and_grads(loss_fn, hidden, weight, targets, options=options)
    want = loss_and_grads(unfused(loss_fn), hidden, weight, targets)
    want = (want[0].view_as(got[0]), *want[1:])          # focal rows come back in targets.shape
    diffs = [(g - w).abs().max().item() for g, w in zip(got, want)]
    print(f"{loss_fn.__name__:>13}: max |diff| loss {diffs[0]:.2e}  grad_hidden {diffs[1]:.2e}  "
          f"grad_weight {diffs[2]:.2e}")
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)                 # fp32 defaults: rtol 1.3e-6, atol 1e-5
print("fused == unfused (fp32 rounding)")
