"""Named model sizes. Each is a function returning a fresh config (variants mutate a copy)."""

from __future__ import annotations

from megatron_hybrid.models.olmo_hybrid.config import OlmoHybridConfig


def olmo_hybrid_7b() -> OlmoHybridConfig:
    """Exactly the released allenai/Olmo-Hybrid-7B (7,430,870,688 parameters, NoPE)."""
    return OlmoHybridConfig()


def olmo_hybrid_7b_rope() -> OlmoHybridConfig:
    """The 7B as pretrained (RoPE theta 500k), before the long-context stage dropped RoPE."""
    return OlmoHybridConfig(rope_theta=500_000.0)


def olmo_hybrid_1b() -> OlmoHybridConfig:
    """A 1B-class sibling (not a released model): OLMo-2-1B trunk widths (d 2048, 16 blocks,
    MLP 8192, 16 heads x 128) with the 7B's recipe kept — 3:1 GDN:attention, GDN key width
    0.75*d as 16 heads x 96 and value dim 2K = 192, RoPE 500k. 1.58 B parameters, 0.41 B of them
    embeddings."""
    return OlmoHybridConfig(
        hidden_size=2048,
        num_layers=16,
        intermediate_size=8192,
        num_attention_heads=16,
        num_key_value_heads=16,
        gdn_num_heads=16,
        gdn_head_k_dim=96,
        gdn_head_v_dim=192,
        rope_theta=500_000.0,
        max_position_embeddings=8192,
    )


def tiny() -> OlmoHybridConfig:
    """Tests and the CPU demo: 8 blocks (G-G-G-*- x 2), 6 GDN and 6 attention heads (so a 4-way
    context split is not a head divisor), K 16 != V 32, ~1.2 M parameters at vocab 512."""
    return OlmoHybridConfig(
        vocab_size=512,
        hidden_size=96,
        num_layers=8,
        intermediate_size=256,
        num_attention_heads=6,
        num_key_value_heads=6,
        gdn_num_heads=6,
        gdn_head_k_dim=16,
        gdn_head_v_dim=32,
        rope_theta=10_000.0,
        max_position_embeddings=4096,
        eos_token_id=None,
        pad_token_id=None,
    )


PRESETS = {
    "olmo_hybrid_7b": olmo_hybrid_7b,
    "olmo_hybrid_7b_rope": olmo_hybrid_7b_rope,
    "olmo_hybrid_1b": olmo_hybrid_1b,
    "tiny": tiny,
}


def get_preset(name: str) -> OlmoHybridConfig:
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
