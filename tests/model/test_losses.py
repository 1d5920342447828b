"""The fused, chunked head + cross-entropy equals the plain one, values and gradients."""

import pytest
import torch
import torch.nn.functional as F

from lmforge.model.losses import IGNORE_INDEX, linear_cross_entropy


@pytest.mark.parametrize("chunk_size", [7, 64, 1000])
def test_fused_loss_and_gradients_match_plain_cross_entropy_in_fp32(chunk_size):
    torch.manual_seed(0)
    hidden = torch.randn(3, 50, 32, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(300, 32, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 300, (3, 50))
    targets[0, :10] = IGNORE_INDEX
    reference = F.cross_entropy((hidden @ weight.t()).view(-1, 300), targets.view(-1))
    ref_grads = torch.autograd.grad(reference, (hidden, weight))
    fused, _ = linear_cross_entropy(hidden, weight, targets, chunk_size=chunk_size)
    grads = torch.autograd.grad(fused * 1.0, (hidden, weight))
    assert torch.allclose(fused.double(), reference, atol=1e-6)
    for got, want in zip(grads, ref_grads, strict=True):
        assert torch.allclose(got, want, atol=1e-6)


def test_fused_loss_under_bf16_autocast_stays_close_to_fp32():
    torch.manual_seed(0)
    hidden = torch.randn(256, 64)
    weight = torch.randn(512, 64) * 0.1
    targets = torch.randint(0, 512, (256,))
    reference = F.cross_entropy(hidden @ weight.t(), targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused, _ = linear_cross_entropy(hidden.requires_grad_(), weight.requires_grad_(), targets)
    assert fused.dtype == torch.float32
    assert abs(fused.item() - reference.item()) < 2e-2
