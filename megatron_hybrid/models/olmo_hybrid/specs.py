"""Layer specs for Olmo Hybrid in two flavours built from one description.

- ``local``: megatron's Column/RowParallelLinear, torch RMSNorm and torch SDPA attention. Runs on
  any device (CPU CI, GPUs without Transformer Engine).
- ``te``: Transformer Engine linears, norms and TEDotProductAttention (GPU; FP8-capable); under
  context parallelism its attention all-gathers K/V and runs TE's THD kernel (te_attention.py).

Sub-layers (megatron-core HybridStack symbols):
    G  OlmoGDNLayer(input_layernorm=RMSNorm, self_attention=OlmoGatedDeltaNet)       pre-norm
    *  TransformerLayer(self_attention=OlmoSelfAttention incl. its post-norm)       post-norm
    -  OlmoMLPLayer (MLP with our fused SwiGLU, layers/swiglu.py; pre- or post-norm, set by
       OlmoHybridStack)

``recompute_modules`` (selective activation recompute, layers/recompute.py) is handed to every
sub-layer that has a part to recompute.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_hybrid import mcore
from megatron_hybrid.layers.attention import (
    OlmoAttentionSubmodules,
    OlmoSelfAttention,
    TorchCausalAttention,
)
from megatron_hybrid.layers.gdn import GDNShape, GDNSubmodules, OlmoGatedDeltaNet, OlmoGDNLayer
from megatron_hybrid.layers.mlp_layer import OlmoMLPLayer, OlmoMLPLayerSubmodules
from megatron_hybrid.layers.norms import RMSNorm
from megatron_hybrid.layers.swiglu import SwiGLU
from megatron_hybrid.layers.te_attention import te_core_attention_class
from megatron_hybrid.models.olmo_hybrid.config import OlmoHybridConfig
from megatron_hybrid.models.olmo_hybrid.stack import OlmoHybridStack

FLAVOURS = ("local", "te")


@dataclass(frozen=True)
class _Parts:
    column: type
    row: type
    norm: type
    core_attention: type


def _parts(flavour: str) -> _Parts:
    if flavour == "local":
        return _Parts(
            mcore.ColumnParallelLinear, mcore.RowParallelLinear, RMSNorm, TorchCausalAttention
        )
    if flavour == "te":
        te = mcore.te_modules()
        # TEDotProductAttention at CP 1; our all-gather-KV CP with TE's THD kernel at CP > 1
        core_attention = te_core_attention_class()
        return _Parts(te.TEColumnParallelLinear, te.TERowParallelLinear, te.TENorm, core_attention)
    raise ValueError(f"unknown layer-spec flavour {flavour!r}; choose one of {FLAVOURS}")


def gdn_shape(cfg: OlmoHybridConfig) -> GDNShape:
    return GDNShape(
        num_heads=cfg.gdn_num_heads,
        head_k_dim=cfg.gdn_head_k_dim,
        head_v_dim=cfg.gdn_head_v_dim,
        conv_kernel=cfg.gdn_conv_kernel,
        allow_neg_eigval=cfg.gdn_allow_neg_eigval,
        norm_eps=cfg.gdn_norm_eps,
        backend=cfg.gdn_backend,
        save_intermediates=cfg.gdn_save_intermediates,
    )


def stack_spec(
    cfg: OlmoHybridConfig, flavour: str = "local", recompute_modules=()
) -> mcore.ModuleSpec:
    """The HybridStack spec (pass to HybridModel as ``hybrid_stack_spec``); ``recompute_modules``
    names the parts recomputed in the backward (selective recompute: core_attn, gdn, mlp,
    layernorm)."""
    p = _parts(flavour)
    rc = {"recompute_modules": frozenset(recompute_modules)}
    gdn_layer = mcore.ModuleSpec(
        module=OlmoGDNLayer,
        params=rc,
        submodules=mcore.TransformerLayerSubmodules(
            input_layernorm=p.norm,
            self_attention=mcore.ModuleSpec(
                module=OlmoGatedDeltaNet,
                params={"gdn": gdn_shape(cfg), **rc},
                submodules=GDNSubmodules(in_proj=p.column, ab_proj=p.column, out_proj=p.row),
            ),
            self_attn_bda=mcore.get_bias_dropout_add,
        ),
    )
    attention_layer = mcore.ModuleSpec(
        module=mcore.TransformerLayer,
        submodules=mcore.TransformerLayerSubmodules(
            self_attention=mcore.ModuleSpec(
                module=OlmoSelfAttention,
                params={"qk_norm_eps": cfg.norm_eps, **rc},
                submodules=OlmoAttentionSubmodules(
                    linear_qkv=p.column,
                    core_attention=p.core_attention,
                    linear_proj=p.row,
                    post_norm=p.norm,
                ),
            ),
            self_attn_bda=mcore.get_bias_dropout_add,
        ),
    )
    mlp_layer = mcore.ModuleSpec(
        module=OlmoMLPLayer,
        params=rc,
        submodules=OlmoMLPLayerSubmodules(
            norm=p.norm,
            mlp=mcore.ModuleSpec(
                module=mcore.MLP,
                # SwiGLU is our fused kernel: megatron's MLP applies it to the whole fc1 output
                # because the config sets use_te_activation_func (models/olmo_hybrid/config.py)
                submodules=mcore.MLPSubmodules(
                    linear_fc1=p.column, linear_fc2=p.row, activation_func=SwiGLU
                ),
            ),
        ),
    )
    return mcore.ModuleSpec(
        module=OlmoHybridStack,
        params={"final_norm": p.norm},
        submodules=mcore.HybridStackSubmodules(
            gdn_layer=gdn_layer, attention_layer=attention_layer, mlp_layer=mlp_layer
        ),
    )
