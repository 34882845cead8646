"""Architecture config of an Olmo-Hybrid model: the single source of truth for its shape.

Everything megatron-core needs (TransformerConfig, layer pattern, layer specs) is derived from
this dataclass; HF ``olmo_hybrid`` configs convert to and from it (hf_mapping.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from megatron_hybrid.errors import ConfigError  # noqa: F401  (re-exported: callers import it here)

GDN_BLOCK, ATTENTION_BLOCK = "gdn", "attention"
_SYMBOL = {GDN_BLOCK: "G", ATTENTION_BLOCK: "*"}

FP8_ALIGN = 16
"""Transformer Engine's FP8 GEMMs need both widths of every weight (and the token count) divisible
by 16 (32 for MXFP8): ``te.pytorch.utils.assert_dim_for_fp8_exec`` plus the transposed operands
of the backward."""


@dataclass(frozen=True)
class Gemm:
    """One weight GEMM of a block, with its widths on one tensor-parallel rank."""

    name: str
    """Module path inside the block, e.g. ``self_attention.in_proj`` (GDN) or ``mlp.linear_fc1``."""
    block: str
    """gdn | attention | mlp | output (the LM head)."""
    rows: int
    """Output features per TP rank."""
    cols: int
    """Input features per TP rank (the GEMM's reduction width)."""
    fp8: bool
    """Runs in FP8 under ``--fp8-format`` (te spec) unless its block is kept in bf16."""
    note: str = ""
    """Why it stays in bf16 (for the ones that do)."""

    @property
    def weights(self) -> int:
        return self.rows * self.cols


@dataclass
class OlmoHybridConfig:
    """Shape of an Olmo-Hybrid model (defaults = the released allenai/Olmo-Hybrid-7B)."""

    vocab_size: int = 100352
    """Rows of the embedding and output layer (tokenizer size padded, e.g. to a multiple of 128)."""
    hidden_size: int = 3840
    """Model width D."""
    num_layers: int = 32
    """Number of blocks (= HF layers). Each block is a mixer (GDN or attention) plus an MLP."""
    block_types: tuple[str, ...] | None = None
    """Per block "gdn" or "attention"; None = attention every 4th block (i % 4 == 3), as released."""
    intermediate_size: int = 11008
    """SwiGLU hidden width of every MLP."""
    norm_eps: float = 1e-6
    """Epsilon of the block norms, the QK norms and the final norm."""
    init_std: float = 0.02
    """Std of the truncated-normal (+-3 std) init of every linear, conv and embedding."""

    num_attention_heads: int = 30
    """Query heads of the attention blocks; head dim = hidden_size / num_attention_heads."""
    num_key_value_heads: int = 30
    """KV heads (< num_attention_heads = GQA). Must divide the query heads and be divisible by TP."""
    rope_theta: float | None = None
    """RoPE base; None = no positional encoding (NoPE, as in the released checkpoints). Olmo Hybrid
    pretrains with 500,000 and drops RoPE for the long-context stage."""
    max_position_embeddings: int = 65536
    """Longest sequence the RoPE tables are built for."""

    gdn_num_heads: int = 30
    """GDN heads (key heads = value heads). Must be divisible by TP."""
    gdn_head_k_dim: int = 96
    """GDN key/query head dim K (state is K x V per head)."""
    gdn_head_v_dim: int = 192
    """GDN value head dim V."""
    gdn_conv_kernel: int = 4
    """Width of the causal depthwise convs on q, k, v."""
    gdn_allow_neg_eigval: bool = True
    """beta = 2*sigmoid (eigenvalues of the transition in (-1, 1]); False = sigmoid (HF flag
    ``linear_allow_neg_eigval``). The negative range is what lets GDN track state (the paper)."""
    gdn_norm_eps: float = 1e-5
    """Epsilon of GDN's gated output RMSNorm (fla's default; differs from norm_eps)."""
    gdn_a_log_range: tuple[float, float] = (0.0, 16.0)
    """A is initialised U(range); A_log = log(A)."""
    gdn_dt_range: tuple[float, float] = (1e-3, 1e-1)
    """dt initialised log-uniform in this range; dt_bias = softplus^-1(dt)."""
    gdn_dt_init_floor: float = 1e-4
    """Lower clamp of the initial dt."""
    gdn_backend: str = "auto"
    """Recurrence implementation: auto | torch | triton | fla (see megatron_hybrid.kernels.gdn)."""
    gdn_save_intermediates: bool = False
    """Keep the GDN kernels' chunk intermediates (W, u, per-chunk states) from the forward for
    the backward instead of recomputing them (triton backend; identical gradients): ~13% less GDN
    kernel time for ~2.9x a bf16 v's size more activation memory per GDN layer (1.1 GB per 32K
    tokens at Olmo Hybrid 7B widths). Runtime only: not part of the checkpointed model."""

    eos_token_id: int | None = 100257
    """End-of-document token (dolma2 tokenizer); written to HF configs."""
    pad_token_id: int | None = 100277
    """Padding token id written to HF configs."""
    tie_word_embeddings: bool = False
    """Olmo Hybrid unties input and output embeddings."""

    def __post_init__(self):
        if self.block_types is None:
            self.block_types = tuple(
                ATTENTION_BLOCK if i % 4 == 3 else GDN_BLOCK for i in range(self.num_layers)
            )
        self.block_types = tuple(self.block_types)
        self.validate()

    # ---- derived -----------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def layer_pattern(self, pipeline_splits: int = 1) -> str:
        """megatron-core pattern, e.g. ``G-G-G-*-``; ``|`` between equal pipeline segments."""
        blocks = [_SYMBOL[t] + "-" for t in self.block_types]
        if pipeline_splits == 1:
            return "".join(blocks)
        if len(blocks) % pipeline_splits:
            raise ConfigError(
                f"{len(blocks)} blocks cannot be split evenly into {pipeline_splits} pipeline "
                "segments; give the boundaries with '|' in the layer pattern"
            )
        per = len(blocks) // pipeline_splits
        return "|".join("".join(blocks[i : i + per]) for i in range(0, len(blocks), per))

    @classmethod
    def block_types_from_pattern(cls, pattern: str) -> tuple[str, ...]:
        """``G-G-G-*-`` (``|`` allowed between blocks) -> block types; clear error otherwise."""
        body = pattern.replace("|", "")
        if len(body) % 2 or any(
            body[i] not in "G*" or body[i + 1] != "-" for i in range(0, len(body), 2)
        ):
            raise ConfigError(
                f"hybrid layer pattern {pattern!r}: Olmo-Hybrid blocks are 'G-' (GDN + MLP) or "
                "'*-' (attention + MLP), optionally separated by '|'"
            )
        return tuple(
            GDN_BLOCK if body[i] == "G" else ATTENTION_BLOCK for i in range(0, len(body), 2)
        )

    def validate(self) -> None:
        def need(cond, msg):
            if not cond:
                raise ConfigError(msg)

        self._check_numbers()
        need(
            len(self.block_types) == self.num_layers,
            f"block_types has {len(self.block_types)} entries but num_layers={self.num_layers}",
        )
        bad = [t for t in self.block_types if t not in (GDN_BLOCK, ATTENTION_BLOCK)]
        need(not bad, f"block_types: unknown block type {bad[:1]} (use 'gdn' or 'attention')")
        need(
            self.hidden_size % self.num_attention_heads == 0,
            f"hidden_size={self.hidden_size} is not divisible by "
            f"num_attention_heads={self.num_attention_heads}",
        )
        need(
            self.num_attention_heads % self.num_key_value_heads == 0,
            f"num_attention_heads={self.num_attention_heads} is not a multiple of "
            f"num_key_value_heads={self.num_key_value_heads}",
        )
        need(self.gdn_conv_kernel >= 1, f"gdn_conv_kernel={self.gdn_conv_kernel} must be >= 1")
        need(
            self.gdn_backend in ("auto", "torch", "triton", "fla", "naive"),
            f"gdn_backend={self.gdn_backend!r}: use auto, torch, triton or fla",
        )
        need(
            not self.tie_word_embeddings, "tie_word_embeddings=True is not supported (Olmo unties)"
        )

    # sizes that must be >= 1, and floats that must be > 0 (the checks below divide by them)
    _SIZES = (
        "vocab_size", "hidden_size", "num_layers", "intermediate_size", "num_attention_heads",
        "num_key_value_heads", "max_position_embeddings", "gdn_num_heads", "gdn_head_k_dim",
        "gdn_head_v_dim",
    )  # fmt: skip
    _POSITIVE = ("norm_eps", "init_std", "gdn_norm_eps", "gdn_dt_init_floor")

    def _check_numbers(self) -> None:
        """Every size >= 1 and every epsilon/std > 0, named with its value (model.FIELD)."""
        for name in self._SIZES:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"model.{name}={v!r}: must be an integer >= 1")
        for name in self._POSITIVE:
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v > 0 and v != float("inf")):
                raise ConfigError(f"model.{name}={v!r}: must be > 0")
        if self.rope_theta is not None and not self.rope_theta > 0:
            raise ConfigError(f"model.rope_theta={self.rope_theta!r}: must be > 0 (or None: NoPE)")
        lo, hi = self.gdn_dt_range
        if not 0 < lo <= hi:
            raise ConfigError(f"model.gdn_dt_range={self.gdn_dt_range!r}: need 0 < low <= high")
        lo, hi = self.gdn_a_log_range
        if not 0 <= lo < hi:
            raise ConfigError(
                f"model.gdn_a_log_range={self.gdn_a_log_range!r}: need 0 <= low < high"
            )
        for name in ("eos_token_id", "pad_token_id"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise ConfigError(f"model.{name}={v!r}: must be >= 0 (or None)")

    def check_parallel(self, tensor_parallel: int) -> None:
        """Raise a ConfigError naming the numbers if this model cannot be split over TP ranks."""
        for name in ("num_attention_heads", "num_key_value_heads", "gdn_num_heads"):
            if getattr(self, name) % tensor_parallel:
                raise ConfigError(
                    f"{name}={getattr(self, name)} is not divisible by tensor parallel size "
                    f"{tensor_parallel}"
                )
        if self.intermediate_size % tensor_parallel:
            raise ConfigError(
                f"intermediate_size={self.intermediate_size} is not divisible by "
                f"tensor parallel size {tensor_parallel}"
            )
        if self.vocab_size % tensor_parallel:
            raise ConfigError(
                f"vocab_size={self.vocab_size} is not divisible by tensor parallel "
                f"size {tensor_parallel} (pad it, e.g. to a multiple of 128)"
            )

    def replace(self, **changes) -> OlmoHybridConfig:
        if "num_layers" in changes and "block_types" not in changes:
            changes["block_types"] = None
        return dataclasses.replace(self, **changes)

    # ---- counts ------------------------------------------------------------------------------
    def num_params_by_type(self) -> dict[str, int]:
        D, V = self.hidden_size, self.vocab_size
        H, K, Vd = self.gdn_num_heads, self.gdn_head_k_dim, self.gdn_head_v_dim
        mlp = 3 * D * self.intermediate_size
        gdn = (
            D * H * (2 * K + 2 * Vd)
            + D * 2 * H
            + H * Vd * D
            + H * (2 * K + Vd) * self.gdn_conv_kernel
            + 2 * H
            + Vd
        )
        n_kv = self.num_key_value_heads * self.head_dim
        attn = D * (D + 2 * n_kv) + D * D + D + n_kv
        n_gdn = self.block_types.count(GDN_BLOCK)
        n_att = self.block_types.count(ATTENTION_BLOCK)
        return {
            "embedding": V * D,
            "gdn_mixers": n_gdn * gdn,
            "attention_mixers": n_att * attn,
            "mlps": self.num_layers * mlp,
            "norms": self.num_layers * 2 * D + D,
            "output_layer": V * D,
        }

    def num_params(self) -> int:
        return sum(self.num_params_by_type().values())

    # ---- GEMMs (FP8 planning) ----------------------------------------------------------------
    def gemms(self, tensor_parallel: int = 1) -> dict[str, list[Gemm]]:
        """The weight GEMMs of each block kind (``gdn``, ``attention``, ``mlp``, ``output``) with
        their widths on one TP rank, and whether each runs in FP8 under the te spec. GDN's
        ``in_proj`` is one GEMM grouped per head ``[q|k|v|g]`` (layers/gdn.py), so its width is
        heads x (2K + 2V): 17280 at Olmo-7B widths, a multiple of 16, where upstream's fused
        [q,k,v,z,beta,alpha] width 17340 is not. The tiny ``ab_proj`` (2 x heads rows) feeding the
        decay and beta stays in bf16 by design, as does the LM head (megatron's own linear)."""
        tp = tensor_parallel
        D, F = self.hidden_size, self.intermediate_size
        H, K, V = self.gdn_num_heads // tp, self.gdn_head_k_dim, self.gdn_head_v_dim
        n_q, n_kv, d = self.num_attention_heads // tp, self.num_key_value_heads // tp, self.head_dim
        return {
            GDN_BLOCK: [
                Gemm("self_attention.in_proj", GDN_BLOCK, H * (2 * K + 2 * V), D, True),
                Gemm(
                    "self_attention.ab_proj",
                    GDN_BLOCK,
                    2 * H,
                    D,
                    False,
                    "bf16 by design: feeds the decay exp(-A softplus(a + dt_bias)) and beta, "
                    "precision-sensitive; 2 x heads rows (cannot be FP8-aligned)",
                ),
                Gemm("self_attention.out_proj", GDN_BLOCK, D, H * V, True),
            ],
            ATTENTION_BLOCK: [
                Gemm("self_attention.linear_qkv", ATTENTION_BLOCK, (n_q + 2 * n_kv) * d, D, True),
                Gemm("self_attention.linear_proj", ATTENTION_BLOCK, D, n_q * d, True),
            ],
            "mlp": [
                Gemm("mlp.linear_fc1", "mlp", 2 * F // tp, D, True),
                Gemm("mlp.linear_fc2", "mlp", D, F // tp, True),
            ],
            "output": [
                Gemm(
                    "output_layer",
                    "output",
                    self.vocab_size // tp,
                    D,
                    False,
                    "LM head in bf16: megatron's ColumnParallelLinear, outside the FP8 region",
                )
            ],
        }

    def fp8_alignment_problems(self, tensor_parallel: int = 1, align: int = FP8_ALIGN) -> list:
        """Every FP8 GEMM width (per TP rank) not divisible by ``align``, as readable strings
        naming the layer and the width; empty when the model is FP8-aligned."""
        out = []
        for kind, gemms in self.gemms(tensor_parallel).items():
            if kind == GDN_BLOCK and GDN_BLOCK not in self.block_types:
                continue
            if kind == ATTENTION_BLOCK and ATTENTION_BLOCK not in self.block_types:
                continue
            for g in gemms:
                if not g.fp8:
                    continue
                for what, width in (("output rows", g.rows), ("input width", g.cols)):
                    if width % align:
                        out.append(f"{kind} {g.name}: {what} {width} per TP rank")
        return out

    # ---- megatron-core -----------------------------------------------------------------------
    def transformer_config(
        self,
        *,
        tensor_parallel: int = 1,
        pipeline_parallel: int = 1,
        virtual_pipeline: int | None = None,
        context_parallel: int = 1,
        sequence_parallel: bool = False,
        params_dtype=torch.float32,
        use_cpu_initialization: bool | None = None,
        **overrides,
    ):
        """The megatron-core TransformerConfig for this model and parallel layout."""
        from megatron_hybrid import mcore

        self.check_parallel(tensor_parallel)
        cpu = not torch.cuda.is_available()
        init = partial(
            torch.nn.init.trunc_normal_,
            mean=0.0,
            std=self.init_std,
            a=-3 * self.init_std,
            b=3 * self.init_std,
        )
        kwargs = dict(
            num_layers=2 * self.num_layers,
            hidden_size=self.hidden_size,
            ffn_hidden_size=self.intermediate_size,
            num_attention_heads=self.num_attention_heads,
            num_query_groups=self.num_key_value_heads,
            kv_channels=self.head_dim,
            normalization="RMSNorm",
            layernorm_epsilon=self.norm_eps,
            gated_linear_unit=True,
            activation_func=F.silu,
            add_bias_linear=False,
            add_qkv_bias=False,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            init_method=init,
            output_layer_init_method=init,
            embedding_init_method=init,
            init_method_std=self.init_std,
            params_dtype=params_dtype,
            bf16=params_dtype == torch.bfloat16,
            fp16=params_dtype == torch.float16,
            pipeline_dtype=params_dtype,
            tensor_model_parallel_size=tensor_parallel,
            pipeline_model_parallel_size=pipeline_parallel,
            virtual_pipeline_model_parallel_size=virtual_pipeline,
            context_parallel_size=context_parallel,
            sequence_parallel=sequence_parallel,
            use_cpu_initialization=cpu
            if use_cpu_initialization is None
            else use_cpu_initialization,
            bias_dropout_fusion=not cpu,
            # The MLP's SwiGLU is our own fused kernel (kernels/swiglu.py; one Triton kernel each
            # way, saves only the fc1 output; megatron's eager ops on CPU), which the layer specs
            # hand to megatron's MLP as its activation module: megatron applies that module to the
            # whole [.., 2F] fc1 output only with use_te_activation_func, which in turn requires
            # bias_activation_fusion off (megatron's torch.compile-fused swiglu, eager without
            # dynamo). Neither flag changes parameters or checkpoint keys.
            bias_activation_fusion=False,
            use_te_activation_func=True,
            # Weights are drawn by models/olmo_hybrid/init.py (same model at every layout).
            perform_initialization=False,
            apply_rope_fusion=False,
            masked_softmax_fusion=False,
            gradient_accumulation_fusion=False,
            persist_layer_norm=False,
            # gloo matches point-to-point messages by (peer, tag) in posting order; megatron's
            # batched p2p posts sends/receives in an order that crosses forward activations and
            # backward gradients between two ranks under the interleaved (virtual) pipeline.
            # The unbatched path orders them even/odd and is correct on gloo.
            batch_p2p_comm=not cpu,
        )
        kwargs.update(overrides)
        return mcore.TransformerConfig(**kwargs)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["block_types"] = list(self.block_types)
        return d
