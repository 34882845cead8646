"""The four small architectures the expressivity suite compares, at equal parameter count.

All four have the same width, depth, heads and training budget; they differ in the mixer of
each block and the GDN beta range:

    transformer     *-*-*-*-   attention + MLP only
    gdn_beta01      G-G-G-G-   GDN, beta = sigmoid in (0, 1) (no negative eigenvalues)
    gdn_beta02      G-G-G-G-   GDN, beta = 2 sigmoid in (0, 2) (Olmo Hybrid's)
    hybrid_beta02   G-G-G-*-   3:1 GDN:attention, beta in (0, 2)

A GDN mixer and an attention mixer of the same width differ in size, so each architecture's
MLP hidden width is set to bring its total parameters to the reference's (gdn_beta02 at the
base MLP width); what is left over is below one MLP column per block (reported).
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_hybrid.models.olmo_hybrid.config import ATTENTION_BLOCK, GDN_BLOCK, OlmoHybridConfig


@dataclass(frozen=True)
class Architecture:
    name: str
    blocks: str
    """Mixer per block: G (GDN) or * (attention); each block also has an MLP."""
    neg_eigval: bool
    """GDN beta in (0, 2) (True) or (0, 1)."""
    label: str

    @property
    def pattern(self) -> str:
        return "".join(b + "-" for b in self.blocks)


def architectures(depth: int = 4) -> dict[str, Architecture]:
    """The suite's four architectures at ``depth`` blocks (3:1 = attention every 4th block)."""
    hybrid = "".join("*" if i % 4 == 3 else "G" for i in range(depth))
    if "*" not in hybrid:
        hybrid = hybrid[:-1] + "*"
    archs = [
        Architecture("transformer", "*" * depth, True, "transformer"),
        Architecture("gdn_beta01", "G" * depth, False, "GDN β∈(0,1)"),
        Architecture("gdn_beta02", "G" * depth, True, "GDN β∈(0,2)"),
        Architecture("hybrid_beta02", hybrid, True, "hybrid 3:1 β∈(0,2)"),
    ]
    return {a.name: a for a in archs}


@dataclass(frozen=True)
class ModelShape:
    """Width and heads shared by every architecture of one comparison."""

    hidden_size: int = 128
    depth: int = 4
    attention_heads: int = 4
    gdn_heads: int = 2
    gdn_head_k_dim: int = 32
    gdn_head_v_dim: int = 64
    mlp_hidden: int = 384
    """MLP width of the reference architecture; the others are adjusted to its size."""
    rope_theta: float | None = 10_000.0
    """Attention's RoPE base (None = NoPE)."""


def model_config(shape: ModelShape, arch: Architecture, vocab_size: int,
                 intermediate_size: int | None = None) -> OlmoHybridConfig:  # fmt: skip
    return OlmoHybridConfig(
        vocab_size=vocab_size,
        hidden_size=shape.hidden_size,
        num_layers=shape.depth,
        block_types=tuple(GDN_BLOCK if b == "G" else ATTENTION_BLOCK for b in arch.blocks),
        intermediate_size=intermediate_size or shape.mlp_hidden,
        num_attention_heads=shape.attention_heads,
        num_key_value_heads=shape.attention_heads,
        gdn_num_heads=shape.gdn_heads,
        gdn_head_k_dim=shape.gdn_head_k_dim,
        gdn_head_v_dim=shape.gdn_head_v_dim,
        gdn_allow_neg_eigval=arch.neg_eigval,
        rope_theta=shape.rope_theta,
        max_position_embeddings=1 << 16,
        eos_token_id=None,
        pad_token_id=None,
    )


def matched_intermediate(shape: ModelShape, archs, vocab_size: int,
                         reference: str = "gdn_beta02") -> dict[str, int]:  # fmt: skip
    """Per architecture, the MLP width whose total parameter count is closest to the
    reference architecture's at ``shape.mlp_hidden``."""
    target = model_config(shape, archs[reference], vocab_size).num_params()
    per_column = 3 * shape.hidden_size * shape.depth  # one more MLP column in every block
    out = {}
    for name, arch in archs.items():
        base = model_config(shape, arch, vocab_size).num_params()
        out[name] = max(1, shape.mlp_hidden + round((target - base) / per_column))
    return out
