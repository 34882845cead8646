"""Transformer Engine core attention for packed rows with document boundaries (GPU).

Our batches are one packed row per micro-batch, sequence-first ``[s, 1, heads, d]`` with
``cu_seqlens`` marking document starts (data/batches.py). TE handles per-document causal
attention natively in its THD layout, so this wrapper reshapes to ``[t, heads, d]`` and hands TE
THD packed-sequence parameters (padding-causal mask); without document boundaries it is plain
causal attention in sbhd.

``te_core_attention_class`` is the TE spec's core attention: megatron's TEDotProductAttention
unchanged at CP 1, and at CP > 1 our all-gather-KV context parallelism with TE's THD kernel for
the local compute (layers/te_cp_attention.py explains why not TE's own CP).
"""

from __future__ import annotations

import copy
import functools

import torch

from megatron_hybrid import mcore
from megatron_hybrid.layers import te_cp_attention
from megatron_hybrid.parallel import context


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


@functools.cache
def te_core_attention_class():
    base = mcore.te_modules().TEDotProductAttention

    class TEContextParallelAttention(base):
        """megatron's TEDotProductAttention; at CP > 1 (the model is built with
        ``context_parallel_size`` > 1 and fed :class:`~megatron_hybrid.parallel.context.
        ContextParallelParams`) K/V are all-gathered over CP and TE attends this rank's queries
        to them in THD form, per document segment (te_cp_attention)."""

        supports_context_parallel = True  # OlmoSelfAttention runs CP only with those that say so

        def __init__(self, config, layer_number, attn_mask_type, attention_type="self", **kw):
            self.cp_size = config.context_parallel_size
            if self.cp_size > 1:
                # TE must not run its own CP (it would expect its per-document zigzag layout):
                # it sees a CP-1 config and no CP group. "cross": every segment has fewer
                # queries than keys, which TE's self-attention paths do not allow.
                config = copy.copy(config)
                config.context_parallel_size = 1
                attention_type = "cross"
            super().__init__(config, layer_number, attn_mask_type, attention_type, **kw)

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
            if self.cp_size == 1:
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
            if not context.is_context_parallel(packed_seq_params):
                raise ValueError(
                    f"built for context parallel size {self.cp_size}: needs ContextParallelParams "
                    "(the zigzag-sharded row), got "
                    f"{type(packed_seq_params).__name__}"
                )
            if attention_bias is not None:
                raise NotImplementedError("attention bias under context parallelism")
            # TE's own forward (the class after megatron's wrapper): megatron's would rewrite the
            # mask type and pass the sbhd packed-sequence fields of the whole row
            attend = te_cp_attention.te_attend(self, super(base, self).forward)
            return te_cp_attention.cp_attention_sbhd(query, key, value, packed_seq_params, attend)

    return TEContextParallelAttention
