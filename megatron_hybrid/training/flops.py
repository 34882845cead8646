"""Training FLOPs per token, by component, for MFU (fwd + bwd = 3 x fwd).

- Matmuls: 2 FLOPs per weight per token forward (every linear incl. the output layer; the input
  embedding is a lookup, norms/gates are elementwise and ignored).
- Attention core, causal: QK^T and PV are each 2*d FLOPs per (query, key) pair per head; a query
  at position t sees t keys, s/2 on average, so forward = 2 * 2*d * s/2 = 2*s*d per token per head.
- GDN depthwise conv: 2*W FLOPs per channel per token.
- GDN core in the chunked (WY) form that the kernels run, chunk c, per head per token forward:
  K K^T, Q K^T and the W = T(beta K) product: 3 x 2*c*K; U = T(beta V) and the intra-chunk
  attention times the new values: 2 x 2*c*V; reading the state for the outputs and for the new
  values, and writing it: 3 x 2*K*V; the triangular solve: c^2/3. dk != dv is kept separate
  (megatron's formula assumes dk == dv and double-counts Olmo's core).
"""

from __future__ import annotations

from megatron_hybrid.models.olmo_hybrid.config import ATTENTION_BLOCK, GDN_BLOCK, OlmoHybridConfig

GDN_CHUNK = 64

# Dense bf16 peak (no sparsity), TFLOP/s per device, for MFU.
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "GH200": 989.0,
    "B200": 2250.0,
    "B300": 2250.0,
    "A100": 312.0,
    "L40S": 362.0,
}


def gdn_core_fwd_flops_per_token_head(k: int, v: int, chunk: int = GDN_CHUNK) -> float:
    return 3 * 2 * chunk * k + 2 * 2 * chunk * v + 3 * 2 * k * v + chunk * chunk / 3


def flops_per_token(cfg: OlmoHybridConfig, seq_len: int) -> dict[str, float]:
    """Training FLOPs per token by component; ``total`` is their sum."""
    D, F = cfg.hidden_size, cfg.intermediate_size
    H, K, V, W = cfg.gdn_num_heads, cfg.gdn_head_k_dim, cfg.gdn_head_v_dim, cfg.gdn_conv_kernel
    n_gdn = cfg.block_types.count(GDN_BLOCK)
    n_att = cfg.block_types.count(ATTENTION_BLOCK)
    kv = cfg.num_key_value_heads * cfg.head_dim
    gdn_proj = D * H * (2 * K + 2 * V) + D * 2 * H + H * V * D
    att_proj = D * (D + 2 * kv) + D * D
    mlp = 3 * D * F
    out = {
        "gdn_projections": 6.0 * n_gdn * gdn_proj,
        "gdn_conv": 6.0 * n_gdn * H * (2 * K + V) * W,
        "gdn_core": 3.0 * n_gdn * H * gdn_core_fwd_flops_per_token_head(K, V),
        "attention_projections": 6.0 * n_att * att_proj,
        "attention_core": 3.0 * n_att * cfg.num_attention_heads * 2 * seq_len * cfg.head_dim,
        "mlp": 6.0 * cfg.num_layers * mlp,
        "output_layer": 6.0 * cfg.vocab_size * D,
    }
    out["total"] = sum(out.values())
    return out


def device_peak_tflops() -> float | None:
    """Dense bf16 peak of this process's GPU, or None (CPU / unknown device)."""
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_BF16_TFLOPS[key]
    return None


def gemm_precision_split(
    cfg: OlmoHybridConfig, seq_len: int, bf16_blocks=frozenset(), fp8: bool = True
) -> dict:
    """Where the step's weight-GEMM FLOPs run under ``--fp8-format`` (te spec): one row per GEMM
    of a block kind (``OlmoHybridConfig.gemms``) with its training FLOPs per token in FP8 and in
    bf16 (GDN's ab_proj and the LM head stay bf16 by design; blocks in ``bf16_blocks`` — from
    ``--first-last-layers-bf16`` — run all their GEMMs in bf16), the totals, and the FP8 share of
    the GEMM FLOPs and of the whole step (``flops_per_token``'s total, which adds the attention
    and GDN cores and the conv; those never run in FP8). ``fp8=False``: everything bf16."""
    kinds = cfg.gemms(1)
    rows = []
    for kind in (GDN_BLOCK, ATTENTION_BLOCK, "mlp", "output"):
        if kind == "output":
            blocks = [0]
        elif kind == "mlp":
            blocks = list(range(cfg.num_layers))
        else:
            blocks = [i for i, t in enumerate(cfg.block_types) if t == kind]
        if not blocks:
            continue
        for g in kinds[kind]:
            n_fp8 = 0 if not (fp8 and g.fp8) else sum(1 for i in blocks if i not in bf16_blocks)
            n_bf16 = len(blocks) - n_fp8
            per = 6.0 * g.weights
            rows.append(
                dict(
                    name=f"{kind} {g.name}",
                    rows=g.rows,
                    cols=g.cols,
                    fp8_layers=n_fp8,
                    bf16_layers=n_bf16,
                    fp8_flops=per * n_fp8,
                    bf16_flops=per * n_bf16,
                    note=g.note,
                )
            )
    fp8_total = sum(r["fp8_flops"] for r in rows)
    gemm_total = fp8_total + sum(r["bf16_flops"] for r in rows)
    step_total = flops_per_token(cfg, seq_len)["total"]
    return dict(
        gemms=rows,
        fp8_flops=fp8_total,
        gemm_flops=gemm_total,
        step_flops=step_total,
        fp8_share_of_gemms=fp8_total / gemm_total,
        fp8_share_of_step=fp8_total / step_total,
    )
