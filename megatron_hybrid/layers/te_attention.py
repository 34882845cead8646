"""Transformer Engine core attention for packed rows with document boundaries (GPU).

Our batches are one packed row per micro-batch, sequence-first ``[s, 1, heads, d]`` with
``cu_seqlens`` marking document starts (data/batches.py). TE handles per-document causal
attention natively in its THD layout, so this wrapper reshapes to ``[t, heads, d]`` and hands TE
THD packed-sequence parameters (padding-causal mask); without document boundaries it is plain
causal attention in sbhd.
"""

from __future__ import annotations

import torch

from megatron_hybrid import mcore


def te_packed_attention_class():
    base = mcore.te_modules().TEDotProductAttention

    class TEPackedDocumentAttention(base):
        _cache: tuple | None = None

        def _thd_params(self, cu: torch.Tensor):
            # max document length (a host sync, once per micro-batch: cached by tensor identity)
            if self._cache is None or self._cache[0] is not cu:
                max_len = int((cu[1:] - cu[:-1]).max().item())
                params = mcore.PackedSeqParams(
                    qkv_format="thd",
                    cu_seqlens_q=cu.to(torch.int32),
                    cu_seqlens_kv=cu.to(torch.int32),
                    max_seqlen_q=max_len,
                    max_seqlen_kv=max_len,
                )
                TEPackedDocumentAttention._cache = (cu, params)
            return self._cache[1]

        def forward(
            self,
            query,
            key,
            value,
            attention_mask,
            attn_mask_type=None,
            attention_bias=None,
            packed_seq_params=None,
            **kwargs,
        ):
            if packed_seq_params is None or packed_seq_params.qkv_format == "thd":
                return super().forward(
                    query,
                    key,
                    value,
                    attention_mask,
                    attn_mask_type=attn_mask_type or mcore.AttnMaskType.causal,
                    attention_bias=attention_bias,
                    packed_seq_params=packed_seq_params,
                    **kwargs,
                )
            s, b = query.shape[:2]
            if b != 1:
                raise ValueError(f"packed rows must have batch 1, got {b}")
            thd = self._thd_params(packed_seq_params.cu_seqlens_q)
            out = super().forward(
                query.squeeze(1),
                key.squeeze(1),
                value.squeeze(1),
                None,
                attn_mask_type=mcore.AttnMaskType.padding_causal,
                packed_seq_params=thd,
                **kwargs,
            )
            return out.reshape(s, 1, -1)

    return TEPackedDocumentAttention
