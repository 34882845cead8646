"""The fused vocab-parallel CE + z-loss against plain torch (1 rank) — values and gradients."""

from __future__ import annotations

import torch

from megatron_hybrid.training.loss import cross_entropy_with_z_loss


def test_matches_torch_reference():
    torch.manual_seed(0)
    logits = torch.randn(7, 3, 50, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 50, (7, 3))
    coeff = 1e-2
    ce, z = cross_entropy_with_z_loss(logits, target, coeff)
    (ce + coeff * z).sum().backward()
    g_ours = logits.grad.clone()
    logits.grad = None
    lse = torch.logsumexp(logits, -1)
    ref_ce = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), target.flatten(), reduction="none"
    ).view(7, 3)
    torch.testing.assert_close(ce, ref_ce.float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(z, (lse * lse).float(), rtol=1e-6, atol=1e-6)
    (ref_ce + coeff * lse * lse).sum().backward()
    torch.testing.assert_close(g_ours.float(), logits.grad.float(), rtol=1e-5, atol=1e-6)
