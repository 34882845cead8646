"""FLOPs/token of the 7B against a count done by hand from the architecture (fact sheet)."""

from __future__ import annotations

from megatron_hybrid.models.olmo_hybrid.presets import olmo_hybrid_7b
from megatron_hybrid.training.flops import flops_per_token


def test_7b_flops_hand_count():
    s = 8192
    fl = flops_per_token(olmo_hybrid_7b(), s)
    # Per GDN layer, weights used per token: q,k 2x3840x2880, v,g 2x3840x5760, a,b 2x3840x30,
    # o 5760x3840.  24 GDN layers, x6 for fwd+bwd.
    gdn_w = 2 * 3840 * 2880 + 2 * 3840 * 5760 + 2 * 3840 * 30 + 5760 * 3840
    assert fl["gdn_projections"] == 6 * 24 * gdn_w
    # Conv: 2*4 FLOPs per channel (2880+2880+5760 channels), x3.
    assert fl["gdn_conv"] == 3 * 24 * 2 * 4 * 11520
    # Chunked core per head per token fwd (chunk 64, K 96, V 192):
    # KK^T, QK^T, W: 3*2*64*96 = 36864; U, attn*V: 2*2*64*192 = 49152; state: 3*2*96*192 = 110592;
    # solve 64^2/3.
    core = 36864 + 49152 + 110592 + 64 * 64 / 3
    assert abs(fl["gdn_core"] - 3 * 24 * 30 * core) < 1e-3
    # Attention: q,k,v,o 4 x 3840^2 per layer (MHA), 8 layers; causal core 2*s*128 per head fwd.
    assert fl["attention_projections"] == 6 * 8 * 4 * 3840 * 3840
    assert fl["attention_core"] == 3 * 8 * 30 * 2 * s * 128
    assert fl["mlp"] == 6 * 32 * 3 * 3840 * 11008
    assert fl["output_layer"] == 6 * 100352 * 3840
    # dense part = 6 x (non-embedding params - norms - conv - A_log/dt_bias/o_norm)
    assert abs(fl["total"] / 4.4209e10 - 1) < 1e-3
