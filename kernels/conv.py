"""Causal depthwise conv1d (+ SiLU) over time, with resets at packed-document boundaries.

Shape legend: B batch, T time, C channels, W kernel width (4 for Olmo Hybrid).

``y[t, c] = act( sum_{j<W} w[c, j] * x[t - (W-1) + j, c] )`` with x = 0 before the start of the
token's document (or before the sequence start, where ``initial_state`` [B, W-1, C] supplies the
previous tokens instead). This equals torch's ``Conv1d(groups=C, padding=W-1)`` truncated to T,
which is what HF transformers runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import triton_available, triton_interpreting
from .doc_boundaries import doc_start_index


def causal_conv1d_torch(
    x_BTC: torch.Tensor,
    weight_CW: torch.Tensor,
    cu_seqlens: torch.Tensor | None = None,
    activation: str | None = "silu",
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
):
    """Pure-PyTorch reference. Returns y [B, T, C] (and the last W-1 inputs if asked)."""
    B, T, C = x_BTC.shape
    W = weight_CW.shape[-1]
    if weight_CW.shape != (C, W):
        raise ValueError(f"conv weight must be [C={C}, W], got {tuple(weight_CW.shape)}")
    if cu_seqlens is not None and B != 1:
        raise ValueError(f"packed sequences (cu_seqlens) need batch size 1, got {B}")
    if initial_state is None:
        history = x_BTC.new_zeros(B, W - 1, C)
    else:
        history = initial_state.to(x_BTC.dtype)
    xp_BTC = torch.cat([history, x_BTC], dim=1)  # [B, W-1+T, C]
    t_idx = torch.arange(T, device=x_BTC.device)
    start = doc_start_index(cu_seqlens, T) if cu_seqlens is not None else None
    y = x_BTC * weight_CW[:, W - 1]
    for d in range(1, W):  # tap reading x[t - d]
        shifted = xp_BTC[:, W - 1 - d : W - 1 - d + T]
        if start is not None:
            # Zero taps that reach into the previous document.
            keep = (t_idx - d >= start).to(x_BTC.dtype)[None, :, None]
            shifted = shifted * keep
        y = y + shifted * weight_CW[:, W - 1 - d]
    if activation == "silu":
        y = F.silu(y)
    elif activation not in (None, "identity"):
        raise ValueError(f"unsupported activation {activation!r}")
    if output_final_state:
        return y, xp_BTC[:, -(W - 1) :].clone() if W > 1 else xp_BTC[:, :0]
    return y


BACKENDS = ("auto", "torch", "triton")


def causal_conv1d(
    x_BTC,
    weight_CW,
    cu_seqlens=None,
    activation="silu",
    initial_state=None,
    output_final_state=False,
    backend: str = "auto",
):
    """Entry point used by the GDN mixer (arguments and results as :func:`causal_conv1d_torch`).

    backend: "torch" (the reference above), "triton" (:mod:`.conv_triton`), or "auto": Triton
    for CUDA tensors or under TRITON_INTERPRET=1 (the CPU interpreter), else torch.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown conv backend {backend!r}; valid backends: {', '.join(BACKENDS)}")
    if backend == "auto":
        use_triton = (x_BTC.is_cuda or triton_interpreting()) and triton_available()
        backend = "triton" if use_triton else "torch"
    if backend == "triton":
        # imported here: model code imports this module on machines without a GPU
        from .conv_triton import causal_conv1d_triton

        return causal_conv1d_triton(
            x_BTC, weight_CW, cu_seqlens, activation, initial_state, output_final_state
        )
    return causal_conv1d_torch(
        x_BTC, weight_CW, cu_seqlens, activation, initial_state, output_final_state
    )
