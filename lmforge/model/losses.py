"""Output projection fused with cross-entropy, computed in chunks of tokens.

The plain path materialises [tokens, vocab] logits in fp32, their log-softmax, and the
same again for the backward pass; for a small model that is a third of a training step.
Here each chunk's logits live only long enough to produce the loss and both gradients
(d hidden, d weight), which are kept for backward. Same math, far less memory traffic
(the idea behind Liger-Kernel's fused linear cross-entropy).

An optional z-loss, `z_loss * mean(logsumexp(logits)^2)` (PaLM, section 5), keeps the output
logits from drifting; it is added to the gradient and returned on its own, so the loss that
is logged stays the cross-entropy.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100  # as F.cross_entropy: targets equal to it add no loss and no gradient


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size: int, compute_dtype: torch.dtype, z_loss: float):
        """hidden [tokens, dim], weight [vocab, dim], targets [tokens] -> (mean cross-entropy, mean
        squared log-partition), fp32; the gradient is that of cross-entropy + z_loss * the latter."""
        w = weight.to(compute_dtype)
        h_all = hidden.to(compute_dtype)
        valid = targets != IGNORE_INDEX
        count = valid.sum().clamp(min=1).to(torch.float32)
        grad_hidden = torch.empty_like(h_all)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        z_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, h_all.shape[0], chunk_size):
            h = h_all[start : start + chunk_size]
            t = targets[start : start + chunk_size]
            keep = valid[start : start + chunk_size]
            safe_t = torch.where(keep, t, 0)
            logits = (h @ w.t()).float()
            lse = torch.logsumexp(logits, dim=-1)
            target_logit = logits.gather(1, safe_t[:, None]).squeeze(1)
            loss += ((lse - target_logit) * keep).sum()
            z_sum += (lse.square() * keep).sum()
            # d loss / d logits = softmax - onehot(target), scaled by 1/count, zero if ignored;
            # the z-loss adds 2 * z_loss * lse * softmax.
            probs = logits.sub_(lse[:, None]).exp_()
            if z_loss:
                probs.mul_(1 + 2 * z_loss * lse[:, None])
            probs[torch.arange(len(t), device=h.device), safe_t] -= 1
            grad_logits = probs.mul_((keep / count)[:, None]).to(compute_dtype)
            grad_hidden[start : start + chunk_size] = grad_logits @ w
            grad_weight += grad_logits.t() @ h
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.hidden_dtype, ctx.weight_dtype = hidden.dtype, weight.dtype
        z_mean = z_sum / count
        ctx.mark_non_differentiable(z_mean)
        return loss / count, z_mean

    @staticmethod
    def backward(ctx, grad_output, _grad_z):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (
            (grad_hidden * grad_output).to(ctx.hidden_dtype),
            (grad_weight * grad_output).to(ctx.weight_dtype),
            None,
            None,
            None,
            None,
        )


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int = 256, z_loss: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of `hidden @ weight.T` against `targets` (in the autocast dtype if any),
    and the mean squared log-partition (no gradient of its own; `z_loss` weighs it in the loss's)."""
    device_type = hidden.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
    with torch.autocast(device_type, enabled=False):
        return ChunkedLinearCrossEntropy.apply(
            hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1), chunk_size, dtype, z_loss
        )
