"""The training objective: per-token cross entropy + z-loss, summed over unmasked tokens.

The per-token math (vocab-parallel, bf16 logits read in place, gradient written into the logits'
buffer) is the kernel in ``megatron_hybrid.kernels.cross_entropy``; this module only applies the
loss mask and builds what the schedule and the iteration line need. Olmo trains with z-loss
coefficient 1e-5 (keeps the softmax normaliser near 1, which keeps bf16 logits well-conditioned).
"""

from __future__ import annotations

import torch

from megatron_hybrid.kernels.cross_entropy import cross_entropy_with_z_loss


def masked_lm_loss(logits_bsV, labels_bs, loss_mask_bs, z_coeff: float, tp_group, nan=False):
    """``(loss sum, token count, {"sums": [ce sum, z sum, tokens]})`` for megatron's schedule
    (``calculate_per_token_loss``: it divides by the global token count later).

    The logits' buffer receives their gradient (nothing reads the model output after the loss).
    ``nan``: test hook, poisons the loss and the report (NaN-skipping tests)."""
    ce, z = cross_entropy_with_z_loss(logits_bsV, labels_bs, tp_group, inplace_backward=True)
    mask = loss_mask_bs.to(ce.dtype)
    loss = ((ce + z_coeff * z) * mask).sum()
    if nan:
        loss = loss * float("nan")
        ce = ce * float("nan")
    report = torch.stack([(ce.detach() * mask).sum(), (z.detach() * mask).sum(), mask.sum()])
    return loss, mask.sum().to(torch.int), {"sums": report}
