"""Olmo Hybrid's Gated DeltaNet mixer, tensor-parallel over heads.

Shape legend: s sequence, b batch, H heads on this TP rank, K key head dim, V value head dim,
C conv channels on this rank (= H * (2K + V)), D model width.

Projection layout (decided for FP8 and for checkpoint resharding):
- ``in_proj`` is ONE column-parallel GEMM whose output rows are grouped **per head**:
  ``[q_h (K) | k_h (K) | v_h (V) | g_h (V)]`` for h = 0..heads-1. Olmo-7B: 30 x 576 = 17280
  rows, a multiple of 16 (FP8-aligned) at TP 1, 2, 3, 5, ...; upstream's fused width 17340 is
  not. Because every TP shard is a run of whole heads, megatron's plain column-parallel
  checkpoint sharding reshards it at any TP without custom split logic.
- ``ab_proj`` (the decay input a and beta input b, ``[a_h | b_h]`` per head) is a separate
  tiny GEMM (2 x heads rows): it cannot be FP8-aligned and the decay is precision-sensitive,
  so it stays in the model's higher precision **by construction**: under ``--fp8-format`` it is
  built with high-precision weights (``mcore.fp8_params_disabled``) and runs inside
  ``mcore.fp8_disabled()`` (TE autocast disabled), whatever FP8 region encloses the layer. It is
  ~0.3% of a GDN block's projection FLOPs at Olmo-7B widths.
- Under FP8 (te spec) ``in_proj`` and ``out_proj`` are Transformer Engine FP8 GEMMs; the conv,
  the recurrence (no FP8 GDN core exists), the decay/beta math and the gated RMSNorm stay in
  bf16/fp32.
- One depthwise conv weight over the per-head ``[q|k|v]`` channels; A_log / dt_bias per head.
  All of these are sharded by heads like the projections.
- ``out_norm.weight`` (one [V] vector) is *replicated* but used inside the TP region, where each
  rank sees different heads: its gradient is summed over TP in autograd (copy-to-TP-region),
  so it is right with or without sequence parallelism (upstream Megatron-LM bug #7452).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from megatron_hybrid import mcore
from megatron_hybrid.kernels.conv import causal_conv1d
from megatron_hybrid.kernels.gated_rmsnorm import gated_rmsnorm
from megatron_hybrid.kernels.gdn import chunk_gated_delta_rule
from megatron_hybrid.layers import recompute
from megatron_hybrid.layers.column_split import SplitColumnsPerHead
from megatron_hybrid.parallel import context
from megatron_hybrid.parallel.gdn_cp import gdn_conv_and_recurrence_cp


@dataclass
class GDNSubmodules:
    in_proj: type | mcore.ModuleSpec = None
    ab_proj: type | mcore.ModuleSpec = None
    out_proj: type | mcore.ModuleSpec = None


@dataclass(frozen=True)
class GDNShape:
    """Everything the mixer needs beyond megatron's TransformerConfig (see OlmoHybridConfig)."""

    num_heads: int
    head_k_dim: int
    head_v_dim: int
    conv_kernel: int = 4
    allow_neg_eigval: bool = True
    norm_eps: float = 1e-5
    backend: str = "auto"
    save_intermediates: bool = False


class OlmoGatedDeltaNet(mcore.MegatronModule):
    """GDN mixer: returns ``(output [s, b, D], None)`` like megatron's attention modules."""

    def __init__(
        self,
        config: mcore.TransformerConfig,
        submodules: GDNSubmodules,
        layer_number: int = 1,
        gdn: GDNShape = None,
        pg_collection=None,
        recompute_modules: frozenset = frozenset(),
        **_unused,
    ):
        super().__init__(config=config)
        self.gdn = gdn
        # selective recompute "gdn": conv + recurrence rerun in the backward from their inputs
        self.recompute_conv_and_recurrence = "gdn" in recompute_modules
        self.layer_number = layer_number
        self.tp_group = pg_collection.tp
        tp = self.tp_group.size()
        if gdn.num_heads % tp:
            raise ValueError(f"GDN heads ({gdn.num_heads}) must be divisible by TP size ({tp})")
        H, K, V = gdn.num_heads // tp, gdn.head_k_dim, gdn.head_v_dim
        self.local_heads = H
        self.per_head_in = 2 * K + 2 * V
        common = dict(config=config, bias=False, skip_bias_add=False, is_expert=False)
        common["tp_group"] = self.tp_group
        self.in_proj = mcore.build_module(
            submodules.in_proj,
            config.hidden_size,
            gdn.num_heads * self.per_head_in,
            init_method=config.init_method,
            gather_output=False,
            tp_comm_buffer_name="gdn_in_proj",
            **common,
        )
        with mcore.fp8_params_disabled():  # high-precision weights even with FP8 params
            self.ab_proj = mcore.build_module(
                submodules.ab_proj,
                config.hidden_size,
                gdn.num_heads * 2,
                init_method=config.init_method,
                gather_output=False,
                tp_comm_buffer_name="gdn_ab_proj",
                **common,
            )
        self.out_proj = mcore.build_module(
            submodules.out_proj,
            gdn.num_heads * V,
            config.hidden_size,
            init_method=config.output_layer_init_method,
            input_is_parallel=True,
            tp_comm_buffer_name="gdn_out_proj",
            **common,
        )

        # Per-head parameters, sharded by heads like the projections. Values are set by
        # models/olmo_hybrid/init.py (layout-invariant Olmo init), not here.
        dtype = config.params_dtype
        self.conv_weight = nn.Parameter(torch.empty(H * (2 * K + V), gdn.conv_kernel, dtype=dtype))
        self.A_log = nn.Parameter(torch.zeros(H, dtype=dtype))
        self.dt_bias = nn.Parameter(torch.zeros(H, dtype=dtype))
        for p in (self.conv_weight, self.A_log, self.dt_bias):
            mcore.set_tensor_model_parallel_attributes(p, True, 0, 1)
        self.out_norm_weight = nn.Parameter(torch.ones(V, dtype=dtype))

    def project(self, hidden_states):
        """The mixer's inputs from ``hidden_states`` [s, b, D] (sequence-gathered under SP):
        ``(qkv_bsC, gate_bshV, g_bsh fp32 log decay, beta_bsh)``. Shared by training and by
        generation (inference/decoder.py), which runs the recurrence with a cached state."""
        g_cfg = self.gdn
        H, K, V = self.local_heads, g_cfg.head_k_dim, g_cfg.head_v_dim
        proj_sbX, _ = self.in_proj(hidden_states)
        with mcore.fp8_disabled():  # the decay's inputs stay in high precision (see above)
            ab_sbX, _ = self.ab_proj(hidden_states)
        s, b = proj_sbX.shape[:2]
        proj_bshX = proj_sbX.transpose(0, 1).reshape(b, s, H, self.per_head_in)
        qkv_bshN, gate_bshV = SplitColumnsPerHead.apply(
            proj_bshX, (2 * K + V, self.per_head_in - 2 * K - V), self._copy_backend()
        )
        # the conv reads qkv contiguous, heads flattened into its channels
        qkv_bsC = qkv_bshN.view(b, s, H * (2 * K + V))

        ab_bsh2 = ab_sbX.transpose(0, 1).reshape(b, s, H, 2)
        a_bsh, b_bsh = ab_bsh2[..., 0], ab_bsh2[..., 1]
        beta_bsh = b_bsh.sigmoid()
        if g_cfg.allow_neg_eigval:
            beta_bsh = beta_bsh * 2.0  # eigenvalues of (I - beta k k^T) in (-1, 1]
        # log-decay in fp32: g = -exp(A_log) * softplus(a + dt_bias) <= 0
        g_bsh = -self.A_log.float().exp() * F.softplus(a_bsh.float() + self.dt_bias.float())
        return qkv_bsC, gate_bshV, g_bsh, beta_bsh

    def _copy_backend(self) -> str:
        """The column splits' backend: the GDN torch / naive backends keep torch's copies."""
        return "torch" if self.gdn.backend in ("torch", "naive") else "auto"

    def split_qkv(self, qkv_bsC):
        """Conv output [b, s, C] -> q, k [b, s, H, K] and v [b, s, H, V], contiguous copies
        (the recurrence kernels read them so; one pass each way, see SplitColumnsPerHead)."""
        b, s = qkv_bsC.shape[:2]
        H, K, V = self.local_heads, self.gdn.head_k_dim, self.gdn.head_v_dim
        qkv_bshN = qkv_bsC.view(b, s, H, 2 * K + V)
        return SplitColumnsPerHead.apply(qkv_bshN, (K, K, V), self._copy_backend())

    def output(self, o_bshV, gate_bshV):
        """Gated RMSNorm per head over V then out_proj: ``(out [s, b, D], bias)``."""
        b, s = o_bshV.shape[:2]
        # norm(o) * w * silu(gate), HF's cast order (fused Triton kernel on GPU; the gate is
        # read in place from the projection).
        w = mcore.copy_to_tensor_model_parallel_region(self.out_norm_weight, group=self.tp_group)
        norm_backend = "torch" if self.gdn.backend in ("torch", "naive") else "auto"
        y = gated_rmsnorm(o_bshV, gate_bshV, w, self.gdn.norm_eps, backend=norm_backend)
        y_sbX = y.reshape(b, s, self.local_heads * self.gdn.head_v_dim).transpose(0, 1)
        return self.out_proj(y_sbX.contiguous())

    def forward(self, hidden_states, attention_mask=None, packed_seq_params=None, **_unused):
        qkv_bsC, gate_bshV, g_bsh, beta_bsh = self.project(hidden_states)

        def conv_and_recurrence(qkv_bsC, conv_weight, g_bsh, beta_bsh):
            return self.conv_and_recurrence(
                qkv_bsC, conv_weight, g_bsh, beta_bsh, packed_seq_params
            )

        if self.recompute_conv_and_recurrence and recompute.active(self):
            # keep only the pre-conv qkv, g and beta; the conv output, q/k/v and the kernel's
            # saved intermediates are rebuilt in the backward
            o_bshV = recompute.checkpoint(
                conv_and_recurrence, qkv_bsC, self.conv_weight, g_bsh, beta_bsh
            )
        else:
            o_bshV = conv_and_recurrence(qkv_bsC, self.conv_weight, g_bsh, beta_bsh)
        return self.output(o_bshV, gate_bshV)

    def conv_and_recurrence(self, qkv_bsC, conv_weight, g_bsh, beta_bsh, packed_seq_params):
        """Short convs + SiLU on the pre-conv ``[q|k|v]`` channels, then the chunked gated delta
        rule: ``o [b, s, H, V]`` (under CP: this rank's zigzag chunks, state passed over CP)."""
        K, V = self.gdn.head_k_dim, self.gdn.head_v_dim
        if context.is_context_parallel(packed_seq_params):
            # this rank's two zigzag chunks of the row; conv halo + GDN state passed over CP
            return gdn_conv_and_recurrence_cp(
                qkv_bsC,
                conv_weight,
                g_bsh,
                beta_bsh,
                (K, V),
                packed_seq_params,
                self.gdn.backend,
                self.gdn.save_intermediates,
            )
        cu_seqlens = None
        if packed_seq_params is not None:
            cu_seqlens = packed_seq_params.cu_seqlens_q
        qkv_bsC = causal_conv1d(qkv_bsC, conv_weight, cu_seqlens=cu_seqlens, activation="silu")
        q_bshK, k_bshK, v_bshV = self.split_qkv(qkv_bsC)
        o_bshV, _ = chunk_gated_delta_rule(
            q_bshK,
            k_bshK,
            v_bshV,
            g_bsh,
            beta_bsh,
            scale=K**-0.5,
            cu_seqlens=cu_seqlens,
            use_qk_l2norm_in_kernel=True,
            backend=self.gdn.backend,
            save_intermediates=self.gdn.save_intermediates,
        )
        return o_bshV

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        sd = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        own = {n: p for n, p in self.named_parameters(recurse=False) if n != "out_norm_weight"}
        dp_cp = (metadata or {}).get("dp_cp_group")
        sharded = mcore.make_sharded_tensors_for_checkpoint(
            {n: p for n, p in own.items()},
            prefix,
            {n: 0 for n in own},
            sharded_offsets,
            tp_group=self.tp_group,
            dp_cp_group=dp_cp,
        )
        sd.update(sharded)
        return sd


class OlmoGDNLayer(mcore.TransformerLayer):
    """The ``G`` sub-layer: megatron's TransformerLayer (``h + GDN(RMSNorm(h))``) whose
    ``layernorm`` recompute of the input norm is done here, the way upstream's TransformerLayer
    does it (norm output freed once the mixer's projections saved it, rebuilt from a hook on the
    mixer output's gradient) but with :class:`~megatron_hybrid.layers.recompute
    .CheckpointWithoutOutput`, which needs neither Transformer Engine nor a C++ build. The
    recompute set is kept out of the TransformerConfig (upstream's validation knows no ``gdn``)."""

    def __init__(self, *args, recompute_modules: frozenset = frozenset(), **kwargs):
        super().__init__(*args, **kwargs)
        self.recompute_norm = "layernorm" in recompute_modules

    def _forward_attention(self, hidden_states, *args, **kwargs):
        if not (self.recompute_norm and recompute.active(self)) or args:
            return super()._forward_attention(hidden_states, *args, **kwargs)
        nr = recompute.NormRecompute()
        out_with_bias = self.self_attention(
            nr.norm(self.input_layernorm, hidden_states),
            attention_mask=kwargs.get("attention_mask"),
            packed_seq_params=kwargs.get("packed_seq_params"),
        )
        nr.release(out_with_bias[0])
        with self.bias_dropout_add_exec_handler():
            hidden_states = self.self_attn_bda(self.training, self.config.bias_dropout_fusion)(
                out_with_bias, hidden_states, self.hidden_dropout
            )
        return hidden_states, kwargs.get("context")
