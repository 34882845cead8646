"""Incremental forward of a (TP=1, PP=1) Olmo-Hybrid model with recurrent state.

``HybridDecoder.forward(ids, state)`` consumes any number of new tokens for a batch of sequences
that are all at the same position and returns their logits:
- a chunk of s > 1 tokens (a prompt, or an evaluation window) runs the chunked GDN kernel and
  the conv starting from the cached state, and attention over cached + new keys;
- a single token uses the decode kernels: the conv update and the one-step recurrence (our
  Triton step kernel on GPU, the float64 reference recurrence on CPU), and attention of one query
  over the cache.
Each layer reuses the training modules' own projection and output code (``project``/``output``
of the GDN mixer, ``qkv``/``output`` of attention), so decoding cannot drift from training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_hybrid.inference.cache import AttentionLayerCache, DecodeState, GDNLayerCache
from megatron_hybrid.kernels.conv import causal_conv1d
from megatron_hybrid.kernels.conv_triton import causal_conv1d_update
from megatron_hybrid.kernels.gdn import (
    chunk_gated_delta_rule,
    fused_recurrent_gated_delta_rule_step,
    naive_recurrent_gated_delta_rule,
)
from megatron_hybrid.models.olmo_hybrid.stack import ATTENTION, GDN, MLP


class HybridDecoder:
    def __init__(self, model):
        if not (model.pre_process and model.post_process):
            raise ValueError("generation needs the whole model in one process (PP = 1)")
        if model.config.tensor_model_parallel_size != 1:
            raise ValueError("generation runs at TP = 1 (load the checkpoint into a 1-rank model)")
        self.model = model
        self.stack = model.decoder
        self.symbols = list(self.stack.layer_type_list)
        self._rope_cache = None

    def new_state(self) -> DecodeState:
        caches = []
        for symbol in self.symbols:
            caches.append(
                GDNLayerCache() if symbol == GDN else AttentionLayerCache() if symbol == ATTENTION
                else None
            )  # fmt: skip
        return DecodeState(caches)

    # ---- pieces ------------------------------------------------------------------------------

    def _rope(self, start: int, end: int):
        """RoPE frequencies for positions [start, end) (None for NoPE models)."""
        if getattr(self.model, "position_embedding_type", "none") != "rope":
            return None
        if self._rope_cache is None or self._rope_cache.shape[0] < end:
            self._rope_cache = self.model.rotary_pos_emb(max(end, 2 * start, 256))
        return self._rope_cache[start:end]

    def _gdn(self, mixer, h_sbD, cache: GDNLayerCache):
        K = mixer.gdn.head_k_dim
        s, b = h_sbD.shape[:2]
        qkv_bsC, gate_bshV, g_bsh, beta_bsh = mixer.project(h_sbD)
        if s == 1 and cache.conv_BWC is not None:
            y_bC, cache.conv_BWC = causal_conv1d_update(
                qkv_bsC[:, 0], cache.conv_BWC, mixer.conv_weight, activation="silu"
            )
            q, k, v = mixer.split_qkv(y_bC[:, None])
            if q.is_cuda:
                o_bshV, cache.state_BHKV = fused_recurrent_gated_delta_rule_step(
                    q, k, v, g_bsh, beta_bsh, cache.state_BHKV, scale=K**-0.5,
                    use_qk_l2norm_in_kernel=True,
                )  # fmt: skip
            else:
                o_bshV, cache.state_BHKV = naive_recurrent_gated_delta_rule(
                    q, k, v, g_bsh, beta_bsh, scale=K**-0.5, initial_state=cache.state_BHKV,
                    output_final_state=True, use_qk_l2norm_in_kernel=True,
                )  # fmt: skip
        else:
            y_bsC, cache.conv_BWC = causal_conv1d(
                qkv_bsC, mixer.conv_weight, activation="silu", initial_state=cache.conv_BWC,
                output_final_state=True,
            )  # fmt: skip
            q, k, v = mixer.split_qkv(y_bsC)
            o_bshV, cache.state_BHKV = chunk_gated_delta_rule(
                q, k, v, g_bsh, beta_bsh, scale=K**-0.5, initial_state=cache.state_BHKV,
                output_final_state=True, use_qk_l2norm_in_kernel=True,
                backend=mixer.gdn.backend,
            )  # fmt: skip
        out, _ = mixer.output(o_bshV.to(gate_bshV.dtype), gate_bshV)
        return out

    def _attention(self, attn, h_sbD, cache: AttentionLayerCache, start: int):
        s, b = h_sbD.shape[:2]
        rope = self._rope(start, start + s)
        q_sbNd, k_sbGd, v_sbGd = attn.qkv(h_sbD, rope)
        cache.append(k_sbGd.transpose(0, 1), v_sbGd.transpose(0, 1), start)
        end = start + s
        q_bNsd = q_sbNd.permute(1, 2, 0, 3)
        k_bGLd = cache.k_BLGd[:, :end].transpose(1, 2)
        v_bGLd = cache.v_BLGd[:, :end].transpose(1, 2)
        N, G = q_bNsd.shape[1], k_bGLd.shape[1]
        if N != G:  # GQA: query head n reads KV group n // (N / G), as in training
            k_bGLd = k_bGLd.repeat_interleave(N // G, dim=1)
            v_bGLd = v_bGLd.repeat_interleave(N // G, dim=1)
        scale = attn.head_dim**-0.5
        if s == 1:  # one new token sees every cached position
            o = F.scaled_dot_product_attention(q_bNsd, k_bGLd, v_bGLd, scale=scale)
        elif start == 0:
            o = F.scaled_dot_product_attention(q_bNsd, k_bGLd, v_bGLd, is_causal=True, scale=scale)
        else:  # new tokens at positions [start, end): causal aligned to the last key
            pos_q = torch.arange(start, end, device=q_bNsd.device)
            mask = pos_q[:, None] >= torch.arange(end, device=q_bNsd.device)[None, :]
            o = F.scaled_dot_product_attention(q_bNsd, k_bGLd, v_bGLd, attn_mask=mask, scale=scale)
        ctx_sbX = o.permute(2, 0, 1, 3).reshape(s, b, -1)
        return attn.output(ctx_sbX)

    # ---- the model ---------------------------------------------------------------------------

    @torch.no_grad()
    def forward(self, ids_BS: torch.Tensor, state: DecodeState) -> torch.Tensor:
        """Logits ``[B, s, vocab]`` (fp32) of ``s`` new tokens; ``state`` advances by ``s``."""
        if ids_BS.dim() != 2 or ids_BS.shape[1] == 0:
            raise ValueError(f"ids must be [batch, s >= 1], got {tuple(ids_BS.shape)}")
        B, s = ids_BS.shape
        start = state.length
        positions = torch.arange(start, start + s, device=ids_BS.device)[None].expand(B, s)
        h = self.model.embedding(input_ids=ids_BS, position_ids=positions)  # [s, B, D]
        for symbol, layer, cache in zip(self.symbols, self.stack.layers, state.layers):
            if symbol == GDN:
                h = h + self._gdn(layer.self_attention, layer.input_layernorm(h), cache)
            elif symbol == ATTENTION:
                h = h + self._attention(
                    layer.self_attention, layer.input_layernorm(h), cache, start
                )
            elif symbol == MLP:
                h = layer(h)
            else:
                raise ValueError(f"unknown layer symbol {symbol!r}")
        if getattr(self.stack, "final_norm", None) is not None and self.stack.post_layer_norm:
            h = self.stack.final_norm(h)
        logits_sBV, _ = self.model.output_layer(h)
        state.length = start + s
        return logits_sBV.transpose(0, 1).float()
