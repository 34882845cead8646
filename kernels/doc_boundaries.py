"""Packed-document boundaries (``cu_seqlens``) as per-token indices, shared by the conv
reference (conv.py) and its Triton kernel (conv_triton.py), which dispatch to each other."""

from __future__ import annotations

import torch


def doc_start_index(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """For each packed token, the index of the first token of its document. [T]"""
    cu = cu_seqlens.to(torch.long)
    lengths = cu[1:] - cu[:-1]
    return torch.repeat_interleave(cu[:-1], lengths, output_size=total)
