"""What a decoding model carries from one token to the next.

A hybrid model's decode state is small and mostly fixed-size: each GDN layer keeps its
recurrent state ``S`` ([B, H, K, V], fp32 — the same precision the chunked kernel accumulates
in) and the last ``W-1`` conv inputs; only the attention layers grow, by one K and one V row
per token. At Olmo-Hybrid-7B widths a GDN layer's state is 30 x 96 x 192 x 4 B = 2.2 MB per
sequence whatever the context length.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class GDNLayerCache:
    conv_BWC: torch.Tensor | None = None
    """The last W-1 conv inputs (the [q|k|v] projections), oldest first; None before any token."""
    state_BHKV: torch.Tensor | None = None
    """The recurrent state after the last token, fp32; None before any token (= zeros)."""


@dataclass
class AttentionLayerCache:
    k_BLGd: torch.Tensor | None = None
    """Keys after QK-norm and RoPE for positions [0, capacity); valid up to ``DecodeState.length``."""
    v_BLGd: torch.Tensor | None = None

    def append(self, k_BsGd: torch.Tensor, v_BsGd: torch.Tensor, start: int) -> None:
        """Write positions [start, start + s), growing the buffers geometrically when full."""
        end = start + k_BsGd.shape[1]
        if self.k_BLGd is None or self.k_BLGd.shape[1] < end:
            capacity = max(end, 2 * (0 if self.k_BLGd is None else self.k_BLGd.shape[1]), 64)
            B, _, G, d = k_BsGd.shape
            k_new = k_BsGd.new_empty(B, capacity, G, d)
            v_new = v_BsGd.new_empty(B, capacity, G, v_BsGd.shape[-1])
            if self.k_BLGd is not None:
                k_new[:, :start] = self.k_BLGd[:, :start]
                v_new[:, :start] = self.v_BLGd[:, :start]
            self.k_BLGd, self.v_BLGd = k_new, v_new
        self.k_BLGd[:, start:end] = k_BsGd
        self.v_BLGd[:, start:end] = v_BsGd


@dataclass
class DecodeState:
    """Per-layer caches of one batch of sequences, all at the same position ``length``."""

    layers: list = field(default_factory=list)
    length: int = 0
    """Tokens consumed so far (the position of the next token)."""

    def memory_bytes(self) -> int:
        total = 0
        for c in filter(None, self.layers):
            for t in vars(c).values():
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return total
