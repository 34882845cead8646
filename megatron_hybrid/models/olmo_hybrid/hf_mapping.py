"""HF ``olmo_hybrid`` <-> megatron_hybrid: configs and weights.

Weights are mapped between the HF on-disk layout (the released checkpoint's key names, split
q/k/v convs) and our **unsharded** (TP=1) megatron state dict; ``shard_for_rank`` /
``unshard_from_ranks`` move between that and a TP rank's local tensors, using the attributes
megatron-core puts on each parameter. Every tensor is mapped exactly once: leftovers, missing
keys and wrong shapes are errors naming the key.

Our layouts (see layers/gdn.py, layers/attention.py):
- GDN ``in_proj`` rows per head ``[q_h | k_h | v_h | g_h]``; ``ab_proj`` per head ``[a_h | b_h]``;
  ``conv_weight`` channels per head ``[q_h | k_h | v_h]``.
- attention ``linear_qkv`` rows per KV group ``[q heads of the group | k | v]``.
- MLP ``linear_fc1`` = ``[gate; up]`` (megatron SwiGLU).
Sub-layer ``2i`` is block i's mixer, ``2i+1`` its MLP.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from megatron_hybrid.models.olmo_hybrid.config import (
    ATTENTION_BLOCK,
    ConfigError,
    OlmoHybridConfig,
)
from megatron_hybrid.parallel.sharding import shard_tensor, unshard_tensor

# ---------------------------------------------------------------------------------------------
# configs


def config_from_hf(hf: Mapping | object, vocab_multiple: int = 1) -> OlmoHybridConfig:
    """OlmoHybridConfig from an HF config (object or config.json dict); unsupported -> ConfigError.

    ``vocab_multiple`` pads the vocabulary up (e.g. to the TP size); padded rows are zero.
    """
    get = (
        (lambda k, d=None: hf.get(k, d))
        if isinstance(hf, Mapping)
        else (lambda k, d=None: getattr(hf, k, d))
    )
    if get("model_type") != "olmo_hybrid":
        raise ConfigError(f"model_type={get('model_type')!r}: only 'olmo_hybrid' is supported")

    def refuse(field, value, why):
        raise ConfigError(f"unsupported HF config field {field}={value!r}: {why}")

    if get("hidden_act", "silu") != "silu":
        refuse("hidden_act", get("hidden_act"), "Olmo Hybrid's MLP is SwiGLU (silu)")
    if get("attention_bias", False):
        refuse("attention_bias", True, "Olmo Hybrid has no biases")
    if get("mlp_bias", False):
        refuse("mlp_bias", True, "Olmo Hybrid has no biases")
    if get("tie_word_embeddings", False):
        refuse("tie_word_embeddings", True, "Olmo Hybrid unties embeddings")
    if get("sliding_window") is not None:
        refuse("sliding_window", get("sliding_window"), "hybrid attention layers are full")
    nk, nv = get("linear_num_key_heads"), get("linear_num_value_heads")
    if nk is not None and nv is not None and nk != nv:
        refuse("linear_num_value_heads", nv, f"must equal linear_num_key_heads={nk}")
    rope = get("rope_parameters") or {}
    rope_type = rope.get("rope_type", "default")
    if rope_type not in (None, "default"):
        refuse("rope_parameters.rope_type", rope_type, "only plain RoPE or NoPE is supported")
    hidden, heads = get("hidden_size"), get("num_attention_heads")
    head_dim = get("head_dim")
    if (
        head_dim is not None
        and not isinstance(head_dim, AttributeError)
        and head_dim * heads != hidden
    ):
        refuse("head_dim", head_dim, f"must be hidden_size/num_attention_heads={hidden // heads}")
    layer_types = list(get("layer_types"))
    bad = sorted({t for t in layer_types} - {"linear_attention", "full_attention"})
    if bad:
        refuse("layer_types", bad[0], "use 'linear_attention' or 'full_attention'")
    vocab = get("vocab_size")
    padded = -(-vocab // vocab_multiple) * vocab_multiple
    return OlmoHybridConfig(
        vocab_size=padded,
        hidden_size=hidden,
        num_layers=get("num_hidden_layers"),
        block_types=tuple("gdn" if t == "linear_attention" else "attention" for t in layer_types),
        intermediate_size=get("intermediate_size"),
        norm_eps=get("rms_norm_eps"),
        init_std=get("initializer_range", 0.02),
        num_attention_heads=heads,
        num_key_value_heads=get("num_key_value_heads") or heads,
        rope_theta=rope.get("rope_theta"),
        max_position_embeddings=get("max_position_embeddings"),
        gdn_num_heads=nk,
        gdn_head_k_dim=get("linear_key_head_dim"),
        gdn_head_v_dim=get("linear_value_head_dim"),
        gdn_conv_kernel=get("linear_conv_kernel_dim", 4),
        gdn_allow_neg_eigval=bool(get("linear_allow_neg_eigval", True)),
        gdn_a_log_range=(get("linear_a_log_min", 0.0), get("linear_a_log_max", 16.0)),
        gdn_dt_range=(get("linear_dt_min", 1e-3), get("linear_dt_max", 0.1)),
        gdn_dt_init_floor=get("linear_dt_init_floor", 1e-4),
        eos_token_id=get("eos_token_id"),
        pad_token_id=get("pad_token_id"),
    )


def hf_config_dict(cfg: OlmoHybridConfig, vocab_size: int | None = None) -> dict:
    """config.json contents for transformers' OlmoHybridForCausalLM."""
    return {
        "model_type": "olmo_hybrid",
        "architectures": ["OlmoHybridForCausalLM"],
        "vocab_size": vocab_size or cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.norm_eps,
        "initializer_range": cfg.init_std,
        "tie_word_embeddings": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "layer_types": [
            "linear_attention" if t == "gdn" else "full_attention" for t in cfg.block_types
        ],
        "linear_num_key_heads": cfg.gdn_num_heads,
        "linear_num_value_heads": cfg.gdn_num_heads,
        "linear_key_head_dim": cfg.gdn_head_k_dim,
        "linear_value_head_dim": cfg.gdn_head_v_dim,
        "linear_conv_kernel_dim": cfg.gdn_conv_kernel,
        "linear_allow_neg_eigval": cfg.gdn_allow_neg_eigval,
        "linear_a_log_min": cfg.gdn_a_log_range[0],
        "linear_a_log_max": cfg.gdn_a_log_range[1],
        "linear_dt_min": cfg.gdn_dt_range[0],
        "linear_dt_max": cfg.gdn_dt_range[1],
        "linear_dt_init_floor": cfg.gdn_dt_init_floor,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "bos_token_id": None,
    }


# ---------------------------------------------------------------------------------------------
# weights: HF on-disk layout <-> unsharded megatron layout


def split_fused_conv(hf_sd: Mapping[str, torch.Tensor], cfg: OlmoHybridConfig) -> dict:
    """transformers keeps q/k/v convs fused in memory (``conv1d.weight``); files hold them split."""
    out = {}
    key_dim = cfg.gdn_num_heads * cfg.gdn_head_k_dim
    value_dim = cfg.gdn_num_heads * cfg.gdn_head_v_dim
    for name, t in hf_sd.items():
        if name.endswith("linear_attn.conv1d.weight"):
            base = name[: -len("conv1d.weight")]
            q, k, v = t.split([key_dim, key_dim, value_dim], dim=0)
            out[base + "q_conv1d.weight"], out[base + "k_conv1d.weight"] = q, k
            out[base + "v_conv1d.weight"] = v
        else:
            out[name] = t
    return out


class _Taker:
    """Pops HF tensors by name, checking shapes; reports what was never taken."""

    def __init__(self, sd: Mapping[str, torch.Tensor]):
        self.sd = dict(sd)

    def __call__(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name not in self.sd:
            raise KeyError(f"HF checkpoint is missing tensor {name!r}")
        t = self.sd.pop(name)
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"HF tensor {name!r} has shape {tuple(t.shape)}, expected {shape}")
        return t

    def finish(self):
        left = sorted(k for k in self.sd if not k.endswith("rotary_emb.inv_freq"))
        if left:
            raise KeyError(f"{len(left)} unexpected HF tensor(s), e.g. {left[:3]}")


def hf_to_megatron(hf_sd: Mapping[str, torch.Tensor], cfg: OlmoHybridConfig) -> dict:
    """HF (on-disk names) -> unsharded megatron state dict."""
    take = _Taker(hf_sd)
    D, F = cfg.hidden_size, cfg.intermediate_size
    H, K, V, W = cfg.gdn_num_heads, cfg.gdn_head_k_dim, cfg.gdn_head_v_dim, cfg.gdn_conv_kernel
    nq, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    out = {}

    def vocab_rows(t):
        # A vocabulary padded beyond the HF size (e.g. for TP) gets zero rows.
        pad = cfg.vocab_size - t.shape[0]
        return torch.cat([t, t.new_zeros(pad, t.shape[1])]) if pad > 0 else t

    hf_vocab = (
        hf_sd["model.embed_tokens.weight"].shape[0]
        if "model.embed_tokens.weight" in hf_sd
        else cfg.vocab_size
    )
    out["embedding.word_embeddings.weight"] = vocab_rows(
        take("model.embed_tokens.weight", (hf_vocab, D))
    )
    out["output_layer.weight"] = vocab_rows(take("lm_head.weight", (hf_vocab, D)))
    out["decoder.final_norm.weight"] = take("model.norm.weight", (D,))
    for i, kind in enumerate(cfg.block_types):
        p, mix, mlp = (
            f"model.layers.{i}.",
            f"decoder.layers.{2 * i}.",
            f"decoder.layers.{2 * i + 1}.",
        )
        if kind == ATTENTION_BLOCK:
            a = p + "self_attn."
            q = take(a + "q_proj.weight", (nq * hd, D)).view(nkv, nq // nkv, hd, D)
            k = take(a + "k_proj.weight", (nkv * hd, D)).view(nkv, 1, hd, D)
            v = take(a + "v_proj.weight", (nkv * hd, D)).view(nkv, 1, hd, D)
            out[mix + "self_attention.linear_qkv.weight"] = torch.cat([q, k, v], 1).reshape(-1, D)
            out[mix + "self_attention.q_norm.weight"] = take(a + "q_norm.weight", (nq * hd,))
            out[mix + "self_attention.k_norm.weight"] = take(a + "k_norm.weight", (nkv * hd,))
            out[mix + "self_attention.linear_proj.weight"] = take(a + "o_proj.weight", (D, nq * hd))
            out[mix + "self_attention.post_norm.weight"] = take(
                p + "post_attention_layernorm.weight", (D,)
            )
            out[mlp + "norm.weight"] = take(p + "post_feedforward_layernorm.weight", (D,))
        else:
            a = p + "linear_attn."
            out[mix + "input_layernorm.weight"] = take(p + "input_layernorm.weight", (D,))
            q = take(a + "q_proj.weight", (H * K, D)).view(H, K, D)
            k = take(a + "k_proj.weight", (H * K, D)).view(H, K, D)
            v = take(a + "v_proj.weight", (H * V, D)).view(H, V, D)
            g = take(a + "g_proj.weight", (H * V, D)).view(H, V, D)
            out[mix + "self_attention.in_proj.weight"] = torch.cat([q, k, v, g], 1).reshape(-1, D)
            aa = take(a + "a_proj.weight", (H, D)).view(H, 1, D)
            bb = take(a + "b_proj.weight", (H, D)).view(H, 1, D)
            out[mix + "self_attention.ab_proj.weight"] = torch.cat([aa, bb], 1).reshape(-1, D)
            cq = take(a + "q_conv1d.weight", (H * K, 1, W)).view(H, K, W)
            ck = take(a + "k_conv1d.weight", (H * K, 1, W)).view(H, K, W)
            cv = take(a + "v_conv1d.weight", (H * V, 1, W)).view(H, V, W)
            out[mix + "self_attention.conv_weight"] = torch.cat([cq, ck, cv], 1).reshape(-1, W)
            out[mix + "self_attention.out_proj.weight"] = take(a + "o_proj.weight", (D, H * V))
            out[mix + "self_attention.out_norm_weight"] = take(a + "o_norm.weight", (V,))
            out[mix + "self_attention.A_log"] = take(a + "A_log", (H,))
            out[mix + "self_attention.dt_bias"] = take(a + "dt_bias", (H,))
            out[mlp + "norm.weight"] = take(p + "post_attention_layernorm.weight", (D,))
        gate = take(p + "mlp.gate_proj.weight", (F, D))
        up = take(p + "mlp.up_proj.weight", (F, D))
        out[mlp + "mlp.linear_fc1.weight"] = torch.cat([gate, up], 0)
        out[mlp + "mlp.linear_fc2.weight"] = take(p + "mlp.down_proj.weight", (D, F))
    take.finish()
    return out


def megatron_to_hf(
    sd: Mapping[str, torch.Tensor], cfg: OlmoHybridConfig, hf_vocab_size: int | None = None
) -> dict:
    """Unsharded megatron state dict -> HF on-disk names (inverse of ``hf_to_megatron``)."""
    src = {k: v for k, v in sd.items() if not k.endswith("_extra_state")}
    take = _Taker(src)
    D, F = cfg.hidden_size, cfg.intermediate_size
    H, K, V, W = cfg.gdn_num_heads, cfg.gdn_head_k_dim, cfg.gdn_head_v_dim, cfg.gdn_conv_kernel
    nq, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    nv = hf_vocab_size or cfg.vocab_size
    out = {
        "model.embed_tokens.weight": take("embedding.word_embeddings.weight", (cfg.vocab_size, D))[
            :nv
        ],
        "lm_head.weight": take("output_layer.weight", (cfg.vocab_size, D))[:nv],
        "model.norm.weight": take("decoder.final_norm.weight", (D,)),
    }
    for i, kind in enumerate(cfg.block_types):
        p, mix, mlp = (
            f"model.layers.{i}.",
            f"decoder.layers.{2 * i}.",
            f"decoder.layers.{2 * i + 1}.",
        )
        if kind == ATTENTION_BLOCK:
            a = p + "self_attn."
            r = nq // nkv
            qkv = take(mix + "self_attention.linear_qkv.weight", ((nq + 2 * nkv) * hd, D))
            qkv = qkv.view(nkv, r + 2, hd, D)
            out[a + "q_proj.weight"] = qkv[:, :r].reshape(nq * hd, D)
            out[a + "k_proj.weight"] = qkv[:, r].reshape(nkv * hd, D)
            out[a + "v_proj.weight"] = qkv[:, r + 1].reshape(nkv * hd, D)
            out[a + "q_norm.weight"] = take(mix + "self_attention.q_norm.weight", (nq * hd,))
            out[a + "k_norm.weight"] = take(mix + "self_attention.k_norm.weight", (nkv * hd,))
            out[a + "o_proj.weight"] = take(mix + "self_attention.linear_proj.weight", (D, nq * hd))
            out[p + "post_attention_layernorm.weight"] = take(
                mix + "self_attention.post_norm.weight", (D,)
            )
            out[p + "post_feedforward_layernorm.weight"] = take(mlp + "norm.weight", (D,))
        else:
            a = p + "linear_attn."
            out[p + "input_layernorm.weight"] = take(mix + "input_layernorm.weight", (D,))
            w = take(mix + "self_attention.in_proj.weight", (H * (2 * K + 2 * V), D)).view(H, -1, D)
            q, k, v, g = w.split([K, K, V, V], dim=1)
            for name, t in zip("qkvg", (q, k, v, g)):
                out[a + f"{name}_proj.weight"] = t.reshape(-1, D)
            ab = take(mix + "self_attention.ab_proj.weight", (2 * H, D)).view(H, 2, D)
            out[a + "a_proj.weight"], out[a + "b_proj.weight"] = ab[:, 0].clone(), ab[:, 1].clone()
            c = take(mix + "self_attention.conv_weight", (H * (2 * K + V), W)).view(H, -1, W)
            cq, ck, cv = c.split([K, K, V], dim=1)
            for name, t in zip("qkv", (cq, ck, cv)):
                out[a + f"{name}_conv1d.weight"] = t.reshape(-1, 1, W)
            out[a + "o_proj.weight"] = take(mix + "self_attention.out_proj.weight", (D, H * V))
            out[a + "o_norm.weight"] = take(mix + "self_attention.out_norm_weight", (V,))
            out[a + "A_log"] = take(mix + "self_attention.A_log", (H,))
            out[a + "dt_bias"] = take(mix + "self_attention.dt_bias", (H,))
            out[p + "post_attention_layernorm.weight"] = take(mlp + "norm.weight", (D,))
        fc1 = take(mlp + "mlp.linear_fc1.weight", (2 * F, D))
        out[p + "mlp.gate_proj.weight"], out[p + "mlp.up_proj.weight"] = (
            fc1[:F].clone(),
            fc1[F:].clone(),
        )
        out[p + "mlp.down_proj.weight"] = take(mlp + "mlp.linear_fc2.weight", (D, F))
    take.finish()
    return {k: v.contiguous() for k, v in out.items()}


# ---------------------------------------------------------------------------------------------
# TP sharding, driven by megatron's parameter attributes


def shard_for_rank(
    full: Mapping[str, torch.Tensor], model: torch.nn.Module, tp_rank: int, tp_size: int
) -> dict:
    """This TP rank's tensors for ``model`` (a PP=1 model chunk) from an unsharded state dict."""
    out = {}
    for name, param in model.named_parameters():
        if name not in full:
            raise KeyError(f"no weight for model parameter {name!r}")
        t = shard_tensor(name, full[name], param, tp_rank, tp_size)
        if t.shape != param.shape:
            raise ValueError(
                f"{name}: weight shape {tuple(t.shape)} != parameter {tuple(param.shape)}"
            )
        out[name] = t
    return out


def unshard_from_ranks(per_rank: list[Mapping[str, torch.Tensor]], model: torch.nn.Module) -> dict:
    """Inverse of ``shard_for_rank`` given every TP rank's tensors (e.g. gathered gradients)."""
    return {
        name: unshard_tensor(name, [sd[name] for sd in per_rank], param)
        for name, param in model.named_parameters()
    }
