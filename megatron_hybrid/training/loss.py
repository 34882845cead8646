"""The training objective: per-token cross entropy + z-loss, summed over unmasked tokens.

The per-token math (vocab-parallel, bf16 logits read in place, gradient written into the logits'
buffer) is the kernel in ``megatron_hybrid.kernels.cross_entropy``; this module only applies the
loss mask and builds what the schedule and the iteration line need. Olmo trains with z-loss
coefficient 1e-5 (keeps the softmax normaliser near 1, which keeps bf16 logits well-conditioned).
"""

from __future__ import annotations

import torch

from megatron_hybrid.kernels.cross_entropy import cross_entropy_with_z_loss
from megatron_hybrid.layers.output_loss import DEFAULT_CHUNK_TOKENS, lm_head_loss


def masked_lm_loss(logits_bsV, labels_bs, loss_mask_bs, z_coeff: float, tp_group, nan=False):
    """``(loss sum, token count, {"sums": [ce sum, z sum, tokens]})`` for megatron's schedule
    (``calculate_per_token_loss``: it divides by the global token count later).

    The logits' buffer receives their gradient (nothing reads the model output after the loss).
    ``nan``: test hook, poisons the loss and the report (NaN-skipping tests)."""
    ce, z = cross_entropy_with_z_loss(logits_bsV, labels_bs, tp_group, inplace_backward=True)
    mask = loss_mask_bs.to(ce.dtype)
    return _with_report(((ce + z_coeff * z) * mask).sum(), ce, z, mask, nan)


def _with_report(loss, ce, z, mask, nan: bool):
    """What megatron's schedule takes from a loss function: ``(loss, tokens, {"sums": [ce sum,
    z sum, tokens]})``; ``nan`` poisons the loss and the report (test hook)."""
    if nan:
        loss = loss * float("nan")
        ce = ce * float("nan")
    report = torch.stack([(ce.detach() * mask).sum(), (z.detach() * mask).sum(), mask.sum()])
    return loss, mask.sum().to(torch.int), {"sums": report}


def masked_lm_head_loss(
    hidden_bsD,
    weight,
    labels_bs,
    loss_mask_bs,
    z_coeff: float,
    tp_group,
    *,
    sequence_parallel: bool = False,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    nan=False,
):
    """:func:`masked_lm_loss` from the final hidden states ``[b, s, D]`` and the output layer's
    weight (``layers/output_loss.py``: the LM head and the loss chunked over tokens, the logits
    never whole). Same loss, same report."""
    mask_sb = loss_mask_bs.t().float()
    loss, ce, z = lm_head_loss(
        hidden_bsD.transpose(0, 1),
        weight,
        labels_bs.t(),
        mask_sb,
        mask_sb * z_coeff,
        tp_group,
        sequence_parallel=sequence_parallel,
        chunk_tokens=chunk_tokens,
    )
    return _with_report(loss, ce, z, mask_sb.reshape(-1), nan)
