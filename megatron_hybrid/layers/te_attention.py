"""Transformer Engine core attention for packed rows with document boundaries (GPU).

Our batches are one packed row per micro-batch, sequence-first ``[s, 1, heads, d]`` with
``cu_seqlens`` marking document starts (data/batches.py). TE handles per-document causal
attention natively in its THD layout, so this wrapper reshapes to ``[t, heads, d]`` and hands TE
THD packed-sequence parameters (padding-causal mask); without document boundaries it is plain
causal attention in sbhd.

``te_core_attention_class`` is the TE spec's core attention: at CP 1 megatron's
TEDotProductAttention, with packed rows sent to TE as THD (per-document causal); at CP > 1 our
all-gather-KV context parallelism with TE's THD kernel for the local compute
(layers/te_cp_attention.py explains why not TE's own CP).
"""

from __future__ import annotations

import copy
import functools

import torch

from megatron_hybrid import mcore
from megatron_hybrid.layers import te_cp_attention
from megatron_hybrid.parallel import context


def _thd_params(cu: torch.Tensor):
    """THD packed-sequence params for one packed row's document starts ``cu``."""
    max_len = int((cu[1:] - cu[:-1]).max().item())  # a host sync, once per micro-batch
    cu32 = cu.to(torch.int32)
    return mcore.PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu32,
        cu_seqlens_kv=cu32,
        max_seqlen_q=max_len,
        max_seqlen_kv=max_len,
    )


@functools.cache
def te_core_attention_class():
    base = mcore.te_modules().TEDotProductAttention

    class TEContextParallelAttention(base):
        """megatron's TEDotProductAttention; at CP > 1 (the model is built with
        ``context_parallel_size`` > 1 and fed :class:`~megatron_hybrid.parallel.context.
        ContextParallelParams`) K/V are all-gathered over CP and TE attends this rank's queries
        to them in THD form, per document segment (te_cp_attention)."""

        supports_context_parallel = True  # OlmoSelfAttention runs CP only with those that say so
        _thd_cache: tuple | None = None

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
            if self.cp_size == 1 and self._has_documents(packed_seq_params):
                return self._packed_documents(query, key, value, packed_seq_params, **kwargs)
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

        @staticmethod
        def _has_documents(psp) -> bool:
            # our trainer's packed rows: sbhd params whose cu_seqlens mark document starts
            return (
                psp is not None
                and psp.qkv_format == "sbhd"
                and psp.cu_seqlens_q is not None
                and psp.cu_seqlens_q.numel() > 2
            )

        def _packed_documents(self, query, key, value, psp, **kwargs):
            """Causal attention within each document of the packed row: megatron's wrapper
            with sbhd params would hand TE a plain causal mask over the whole row (TE ignores
            cu_seqlens for sbhd), so the row goes to TE as THD with padding-causal masking."""
            s, b = query.shape[:2]
            if b != 1:
                raise ValueError(f"packed rows must have batch 1, got {b}")
            cu = psp.cu_seqlens_q
            if self._thd_cache is None or self._thd_cache[0] is not cu:
                # shared by every layer of the micro-batch (same cu_seqlens tensor)
                type(self)._thd_cache = (cu, _thd_params(cu))
            out = super().forward(
                query.squeeze(1),
                key.squeeze(1),
                value.squeeze(1),
                None,
                attn_mask_type=mcore.AttnMaskType.padding_causal,
                packed_seq_params=self._thd_cache[1],
                **kwargs,
            )
            return out.reshape(s, 1, -1)

    return TEContextParallelAttention
