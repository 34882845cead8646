"""Olmo 3 attention ("reordered" post-norm), tensor-parallel over KV groups.

Shape legend: s sequence, b batch, G KV groups on this TP rank, r query heads per group,
N = G*r query heads on this rank, d head dim.

    out = RMSNorm_post( o_proj( attn( rope(qnorm(q)), rope(knorm(k)), v ) ) )
(the residual add is done by megatron's TransformerLayer bias-dropout-add.)

- ``linear_qkv`` fuses q, k and v, rows grouped per KV group as ``[q x r | k | v]`` (megatron's
  own layout), so a TP shard is whole groups and resharding needs no custom split.
- The QK RMSNorm spans the full q (k) projection width across heads; under TP its sum of
  squares is all-reduced (``TPFullWidthRMSNorm``) so TP=N equals TP=1.
- RoPE or none (NoPE: the released checkpoints).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megatron_hybrid import mcore
from megatron_hybrid.layers import recompute
from megatron_hybrid.layers.column_split import SplitColumnsPerHead
from megatron_hybrid.layers.norms import TPFullWidthRMSNorm
from megatron_hybrid.parallel import context


@dataclass
class OlmoAttentionSubmodules:
    linear_qkv: type | mcore.ModuleSpec = None
    core_attention: type | mcore.ModuleSpec = None
    linear_proj: type | mcore.ModuleSpec = None
    post_norm: type = None


class TorchCausalAttention(torch.nn.Module):
    """Core attention on any device via torch SDPA (the local spec's TEDotProductAttention).

    Inputs are megatron's ``[s, b, heads, d]``; output ``[s, b, heads*d]``. Packed documents
    (THD: b == 1 plus ``cu_seqlens``) get a block-diagonal causal mask. Under context
    parallelism (:class:`~megatron_hybrid.parallel.context.ContextParallelParams`) K and V are
    all-gathered over the CP ranks (S = CP x s keys) and the mask is built from global positions
    and document ids, so each rank attends its local queries exactly as the 1-rank model.
    """

    supports_context_parallel = True

    def __init__(self, config, layer_number=1, attn_mask_type=None, softmax_scale=None, **_):
        super().__init__()
        self.softmax_scale = softmax_scale

    def forward(
        self, q, k, v, attention_mask=None, attn_mask_type=None, packed_seq_params=None, **_
    ):
        s, b, n, d = q.shape
        groups = k.shape[2]
        mask_sS = None  # [s, S] True = attend; None = plain causal
        if context.is_context_parallel(packed_seq_params):
            # all-gather-KV CP: K and V of every CP rank (rank-major, not in global order), the
            # mask from global positions and document ids (causal within documents)
            psp = packed_seq_params
            kv_sbGX = torch.cat([k, v], dim=-1)
            kv_SbGX, pos_k_S = context.gather_sequence_cp(kv_sbGX, psp)
            k, v = kv_SbGX.split([k.shape[-1], v.shape[-1]], dim=-1)
            pos_q_s = psp.positions
            doc_q_s = context.document_ids(pos_q_s, psp.cu_seqlens_q)
            doc_k_S = context.document_ids(pos_k_S, psp.cu_seqlens_q)
            mask_sS = (doc_q_s[:, None] == doc_k_S[None, :]) & (
                pos_q_s[:, None] >= pos_k_S[None, :]
            )
        elif packed_seq_params is not None:
            cu = packed_seq_params.cu_seqlens_q.to(torch.long)
            doc = torch.repeat_interleave(
                torch.arange(cu.numel() - 1, device=q.device), cu[1:] - cu[:-1], output_size=s
            )
            pos = torch.arange(s, device=q.device)
            mask_sS = (doc[:, None] == doc[None, :]) & (pos[:, None] >= pos[None, :])
        q_bnsd, k_bgSd, v_bgSd = (t.permute(1, 2, 0, 3) for t in (q, k, v))
        if groups != n:  # GQA: each KV group serves n // groups query heads
            k_bgSd = k_bgSd.repeat_interleave(n // groups, dim=1)
            v_bgSd = v_bgSd.repeat_interleave(n // groups, dim=1)
        if mask_sS is not None:
            o = F.scaled_dot_product_attention(
                q_bnsd, k_bgSd, v_bgSd, attn_mask=mask_sS, scale=self.softmax_scale
            )
        else:
            o = F.scaled_dot_product_attention(
                q_bnsd, k_bgSd, v_bgSd, is_causal=True, scale=self.softmax_scale
            )
        return o.permute(2, 0, 1, 3).reshape(s, b, n * d)


class OlmoSelfAttention(mcore.MegatronModule):
    """Returns ``(output [s, b, D], None)`` for the TransformerLayer's bias-dropout-add."""

    def __init__(
        self,
        config: mcore.TransformerConfig,
        submodules: OlmoAttentionSubmodules,
        layer_number: int = 1,
        pg_collection=None,
        qk_norm_eps: float = 1e-6,
        recompute_modules: frozenset = frozenset(),
        **_unused,
    ):
        super().__init__(config=config)
        self.layer_number = layer_number
        # selective recompute: "core_attn" reruns the attention core in the backward (saves only
        # q, k, v), "layernorm" the post-norm (saves only the o_proj output)
        self.recompute_core_attention = "core_attn" in recompute_modules
        self.recompute_norm = "layernorm" in recompute_modules
        self.tp_group = pg_collection.tp
        tp = self.tp_group.size()
        heads, groups, d = config.num_attention_heads, config.num_query_groups, config.kv_channels
        if heads % groups:
            raise ValueError(f"attention heads ({heads}) must be a multiple of KV heads ({groups})")
        if groups % tp:
            raise ValueError(f"KV heads ({groups}) must be divisible by TP size ({tp})")
        self.group_size = heads // groups
        self.local_groups = groups // tp
        self.head_dim = d
        common = dict(
            config=config, bias=False, skip_bias_add=False, is_expert=False, tp_group=self.tp_group
        )
        self.linear_qkv = mcore.build_module(
            submodules.linear_qkv,
            config.hidden_size,
            (heads + 2 * groups) * d,
            init_method=config.init_method,
            gather_output=False,
            tp_comm_buffer_name="qkv",
            **common,
        )
        self.q_norm = TPFullWidthRMSNorm(config, heads * d, qk_norm_eps, self.tp_group)
        self.k_norm = TPFullWidthRMSNorm(config, groups * d, qk_norm_eps, self.tp_group)
        self.core_attention = mcore.build_module(
            submodules.core_attention,
            config=config,
            layer_number=layer_number,
            attn_mask_type=mcore.AttnMaskType.causal,
            attention_type="self",
            softmax_scale=1.0 / math.sqrt(d),
            pg_collection=pg_collection,
        )
        self.linear_proj = mcore.build_module(
            submodules.linear_proj,
            heads * d,
            config.hidden_size,
            init_method=config.output_layer_init_method,
            input_is_parallel=True,
            tp_comm_buffer_name="proj",
            **common,
        )
        self.post_norm = submodules.post_norm(
            config=config, hidden_size=config.hidden_size, eps=config.layernorm_epsilon
        )

    def forward(
        self,
        hidden_states,
        attention_mask=None,
        rotary_pos_emb=None,
        packed_seq_params=None,
        **_unused,
    ):
        if context.is_context_parallel(packed_seq_params) and not getattr(
            self.core_attention, "supports_context_parallel", False
        ):
            # A core attention opts in by setting ``supports_context_parallel = True`` (it must
            # then accept ContextParallelParams: local queries of the zigzag layout).
            raise NotImplementedError(
                f"{type(self.core_attention).__name__} does not implement context parallelism "
                "(all-gather KV over the zigzag layout): use context parallel size 1"
            )
        q_sbNd, k_sbGd, v_sbGd = self.qkv(hidden_states, rotary_pos_emb)

        def core_attention(q, k, v):
            return self.core_attention(
                q,
                k,
                v,
                attention_mask,
                attn_mask_type=mcore.AttnMaskType.causal,
                packed_seq_params=packed_seq_params,
            )

        qkv = (q_sbNd.contiguous(), k_sbGd.contiguous(), v_sbGd.contiguous())
        if self.recompute_core_attention and recompute.active(self):
            ctx = recompute.checkpoint(core_attention, *qkv)
        else:
            ctx = core_attention(*qkv)
        return self.output(ctx), None

    def qkv(self, hidden_states, rotary_pos_emb=None):
        """Normed, rotated q [s, b, N, d] and k [s, b, G, d], and v [s, b, G, d]. Shared by
        training and by generation (inference/decoder.py), which keeps k and v in a cache."""
        qkv_sbX, _ = self.linear_qkv(hidden_states)
        s, b = qkv_sbX.shape[:2]
        G, r, d = self.local_groups, self.group_size, self.head_dim
        qkv_sbGX = qkv_sbX.view(s, b, G, (r + 2) * d)
        # one copy pass into contiguous q, k, v (and one merge of their gradients) instead of
        # strided slice copies and zero-fill + add backwards (layers/column_split.py)
        q_sbGX, k_sbGd, v_sbGd = SplitColumnsPerHead.apply(qkv_sbGX, (r * d, d, d), "auto")
        q_sbNd = self.q_norm(q_sbGX.view(s, b, G * r * d)).view(s, b, G * r, d)
        k_sbGd = self.k_norm(k_sbGd.view(s, b, G * d)).view(s, b, G, d)
        if rotary_pos_emb is not None:
            q_emb, k_emb = (
                rotary_pos_emb
                if isinstance(rotary_pos_emb, tuple)
                else (rotary_pos_emb, rotary_pos_emb)
            )
            # Positions run over the whole packed sequence; RoPE is relative, so within a
            # document the scores equal those of per-document positions.
            q_sbNd = mcore.apply_rotary_pos_emb(q_sbNd, q_emb, config=self.config)
            k_sbGd = mcore.apply_rotary_pos_emb(k_sbGd, k_emb, config=self.config)
        return q_sbNd, k_sbGd, v_sbGd

    def output(self, ctx_sbX):
        """o_proj then the Olmo 3 post-norm: [s, b, N*d] -> [s, b, D]."""
        out, bias = self.linear_proj(ctx_sbX)
        assert bias is None
        if self.recompute_norm and recompute.active(self):
            # nothing downstream saves the post-norm's output (a residual add follows)
            return recompute.checkpoint(self.post_norm, out)
        return self.post_norm(out)
