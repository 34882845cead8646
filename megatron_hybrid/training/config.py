"""The run config: one dataclass per component, the single source of truth for a training run.

Built from a preset, an optional YAML file, Megatron-style flags (``--tensor-model-parallel-size
2``) and ``section.field=value`` overrides, in that order (later wins); see cli.py.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field

from megatron_hybrid.data.synthetic import SyntheticConfig
from megatron_hybrid.models.olmo_hybrid.config import ConfigError, OlmoHybridConfig


@dataclass
class ParallelConfig:
    tensor: int = 1
    """Tensor-parallel size (>= 1). Splits heads and MLP columns; must divide every head count."""
    pipeline: int = 1
    """Pipeline-parallel size (>= 1). Splits the block pattern into consecutive stages."""
    virtual_pipeline: int | None = None
    """Virtual stages per pipeline rank (>= 1, interleaved 1F1B); None = plain 1F1B."""
    context: int = 1
    """Context-parallel size (>= 1). Splits each sequence; GDN passes recurrent state between
    shards."""
    sequence_parallel: bool = False
    """Shard norm/residual activations over TP ranks along the sequence (saves memory at TP>1)."""
    distributed_optimizer: bool = False
    """Shard optimizer state over data-parallel ranks (ZeRO-1, megatron's DistributedOptimizer)."""


@dataclass
class DataConfig:
    data_path: list[str] = field(default_factory=list)
    """Indexed-dataset prefixes (``P_text_document``), or a blend ``w1 p1 w2 p2``. Empty = mock."""
    mock: bool = False
    """Synthetic random tokens, no files (smoke runs, benchmarks)."""
    split: str = "99,1,0"
    """train,valid,test weights over documents of each dataset (non-negative numbers, train > 0).
    Every split the run reads must hold at least one document and seq_length + 1 tokens."""
    seq_length: int = 1024
    """Tokens per training sequence (>= 1)."""
    tokenizer_type: str | None = None
    """SentencePieceTokenizer | HuggingFaceTokenizer | None (mock data / explicit vocab)."""
    tokenizer_model: str | None = None
    """Path to the sentencepiece model or HF tokenizer directory/name."""
    vocab_size: int | None = None
    """Model vocabulary (>= 1); default = tokenizer size padded to
    ``make_vocab_size_divisible_by``."""
    make_vocab_size_divisible_by: int = 128
    """Pad the tokenizer's vocabulary up to a multiple of this (>= 1, times TP), as Megatron
    does."""
    document_masking: bool = True
    """Pass document boundaries to the model so GDN state, conv and attention do not cross
    documents packed into one sequence. False = Olmo's 'no intra-doc masking' variant."""
    cache_dir: str | None = None
    """Where megatron's dataset index caches go (default: next to the data)."""
    num_workers: int = 0
    """DataLoader worker processes (>= 0)."""


@dataclass
class OptimConfig:
    lr: float = 3e-4
    """Peak learning rate (>= 0). 0 is accepted for deliberate check runs (a step that must
    leave the weights unchanged) but warned about at startup: it trains nothing."""
    min_lr: float = 3e-5
    """Final learning rate of the decay (0 <= min_lr <= lr, as megatron's scheduler asserts)."""
    warmup_iters: int = 0
    """Linear warmup steps from 0 to ``lr`` (>= 0, fewer than decay_iters)."""
    decay_style: str = "cosine"
    """cosine | linear | WSD | constant."""
    decay_iters: int | None = None
    """Steps over which the LR decays (>= 1; default: train_iters)."""
    wsd_decay_iters: int | None = None
    """WSD: length of the final decay phase (1..decay_iters; default: 10% of decay_iters)."""
    weight_decay: float = 0.1
    """AdamW weight decay (>= 0), not applied to embeddings, norms, A_log, dt_bias (see
    no_decay)."""
    decay_embeddings: bool = False
    """Apply weight decay to the embedding too (Olmo: no)."""
    adam_beta1: float = 0.9
    """Adam first-moment decay, in [0, 1)."""
    adam_beta2: float = 0.95
    """Adam second-moment decay, in [0, 1)."""
    adam_eps: float = 1e-8
    """Adam denominator epsilon (> 0)."""
    clip_grad: float = 1.0
    """Global gradient-norm clip (>= 0; 0 = off)."""
    z_loss: float = 1e-5
    """Coefficient of the z-loss (>= 0; logsumexp^2 of the logits), stabilises the softmax."""
    precision_aware_optimizer: bool = False
    """Keep optimizer state in the dtypes below via Transformer Engine's FusedAdam (megatron's
    --use-precision-aware-optimizer). Needs TE (GPU) and the distributed optimizer. Saves memory
    and optimizer time; see docs/training.md for the accuracy trade-off."""
    main_params_dtype: str = "fp32"
    """fp32 | fp16: the master copy of the weights (with precision_aware_optimizer). fp32 is
    stored as bf16 weight + 16-bit remainder (exact), so it costs no more than fp16."""
    exp_avg_dtype: str = "fp32"
    """fp32 | fp16 | bf16 | fp8: Adam's first moment (with precision_aware_optimizer)."""
    exp_avg_sq_dtype: str = "fp32"
    """fp32 | fp16 | bf16 | fp8: Adam's second moment (with precision_aware_optimizer)."""


@dataclass
class TrainConfig:
    micro_batch_size: int = 1
    """Sequences per forward/backward on one rank (>= 1)."""
    global_batch_size: int = 8
    """Sequences per optimizer step over all data-parallel ranks (>= 1; gradient accumulation
    fills in). With ``rampup_batch_size``, the size the ramp ends at."""
    rampup_batch_size: list[int] | None = None
    """[START, INCREMENT, SAMPLES] (Megatron's --rampup-batch-size): the global batch starts at
    START and grows by INCREMENT in equal steps spread over the first SAMPLES consumed samples
    until ``global_batch_size``. Every size on the way must be divisible by micro_batch_size x
    data-parallel size. ``train_iters`` counts the ramp steps too; the LR schedule keeps its
    iteration boundaries (warmup ends at step ``warmup_iters`` whatever the batch sizes)."""
    train_iters: int = 100
    """Optimizer steps to run (>= 1; total, across resumes)."""
    exit_interval: int | None = None
    """Stop (after saving, if ``save`` is set) when the iteration is a multiple of this (>= 1);
    the LR schedule still spans ``train_iters`` (Megatron's --exit-interval)."""
    seed: int = 1234
    """Seeds model init, data order and dropout (0 <= seed < 2**32, numpy's range)."""
    deterministic: bool = False
    """Bitwise repeatable runs (deterministic torch algorithms, fixed reduction order)."""
    precision: str = "auto"
    """auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32."""
    fp8_format: str | None = None
    """FP8 training through Transformer Engine (te spec, GPU): None = off (bf16 GEMMs) | e4m3
    (E4M3 for activations, weights and gradients) | hybrid (E4M3 forward, E5M2 gradients; the
    usual choice). Every GEMM of both block types runs in FP8 except GDN's tiny ab_proj and the
    LM head (docs/training.md, "FP8")."""
    fp8_recipe: str | None = None
    """How FP8 scales are chosen (TE recipe; None = delayed): delayed (DelayedScaling: per-tensor
    scale from an amax history) | tensorwise (Float8CurrentScaling: per-tensor scale from the
    current tensor) | blockwise (Float8BlockScaling: 1x128 / 128x128 blocks, Hopper with CUDA
    >= 12.9) | mxfp8 (MXFP8BlockScaling: Blackwell only, refused on Hopper)."""
    fp8_margin: int = 0
    """Delayed scaling: scale = 2^-margin x FP8 max / amax (>= 0)."""
    fp8_amax_history_len: int = 1
    """Delayed scaling: amax history length per tensor (>= 1)."""
    fp8_amax_compute_algo: str = "most_recent"
    """Delayed scaling: max | most_recent amax of the history."""
    first_last_layers_bf16: bool = False
    """Keep the first ``num_layers_at_start_in_bf16`` and last ``num_layers_at_end_in_bf16``
    blocks entirely in bf16 under FP8 (not with the delayed recipe: TE reduces its amaxes per
    autocast region, megatron refuses the mix)."""
    num_layers_at_start_in_bf16: int = 1
    """Blocks (mixer + MLP) at the start kept in bf16 with ``first_last_layers_bf16`` (>= 0)."""
    num_layers_at_end_in_bf16: int = 1
    """Blocks (mixer + MLP) at the end kept in bf16 with ``first_last_layers_bf16`` (>= 0)."""
    fp8_param_gather: bool = False
    """Keep the FP8 GEMMs' weights in FP8 (TE quantized parameters) and all-gather them in FP8
    in the distributed optimizer (megatron's --fp8-param-gather); needs
    --use-distributed-optimizer."""
    gradient_accumulation_fusion: bool = True
    """Transformer Engine linears write weight gradients straight into the fp32 main-grad
    buffer (no bf16 wgrad tensor + add). te spec on GPU only; megatron's own lm-head linear
    needs apex for it and keeps the plain path. Megatron's --no-gradient-accumulation-fusion
    turns it off."""
    lm_head_loss_chunk_tokens: int = 8192
    """The LM head and the loss run fused, chunked over this many tokens at a time
    (layers/output_loss.py): the [tokens, vocab] logits never exist whole (12.3 GiB in bf16 at
    64K tokens x 100K vocabulary), and the head's weight gradient goes straight into the fp32
    main-grad buffer. 0 = megatron's unfused output layer + the loss kernel on the whole logits
    (also what fp16 runs use: the fused head needs megatron's constant loss scale of 1)."""
    spec: str = "auto"
    """Layer-spec flavour: auto (te on GPU with Transformer Engine, else local) | te | local."""
    log_interval: int = 1
    """Print the iteration line every N steps (>= 1)."""
    eval_interval: int | None = None
    """Evaluate on the validation split every N steps (>= 1; None = never, and then no
    validation split is built)."""
    eval_iters: int = 10
    """Global batches (of ``global_batch_size``) per evaluation (>= 1)."""
    save: str | None = None
    """Checkpoint directory (``<save>/iter_0000100/``)."""
    load: str | None = None
    """Resume from this directory's latest checkpoint, or from an ``iter_N`` directory itself.
    No checkpoint there is an error, except when ``load`` = ``save`` (first run of a requeued
    job: starts fresh and says so)."""
    finetune: bool = False
    """With ``load``: take only the weights; iteration, optimizer states, LR schedule and data
    position start fresh (e.g. a long-context stage from the pretrained model; Megatron's
    --finetune)."""
    no_load_optim: bool = False
    """With ``load``: take weights, LR schedule, iteration and data position from the checkpoint
    but start the optimizer states (Adam moments) fresh, e.g. to switch the distributed
    optimizer on or off (Megatron's --no-load-optim)."""
    save_interval: int | None = None
    """Save every N steps (>= 1; and at the end when ``save`` is set)."""
    keep_last_checkpoints: int | None = None
    """Keep only the newest N ``iter_*`` checkpoints under ``save`` (>= 1; None keeps all).
    Older ones are deleted after the new one is published, so a crash mid-save still leaves a
    loadable checkpoint. Small runs with frequent saves otherwise fill the disk (a 50 M
    parameter ladder rung saved 10 times: 6 GB)."""
    ckpt_format: str = "torch_dist"
    """megatron-core dist checkpointing format (torch_dist)."""
    verify_checkpoint_checksums: bool = True
    """With ``load``: check every file of the checkpoint against the sha256 manifest written at
    save time (``checksums.sha256``) before reading it; False skips that read of the whole
    checkpoint for very large ones (the manifest is still written on save)."""
    tensorboard_dir: str | None = None
    wandb_project: str | None = None
    gpu_memory_gib: float | None = None
    """Memory of one GPU in GiB (> 0) for the fit check of the memory estimate that --dry-run
    and the startup banner print (training/memory.py); None = the visible CUDA device's, or no
    check without one (e.g. planning a Slurm job on a login node: --gpu-memory-gib 79.2 for an
    80 GB H100)."""
    max_consecutive_nan: int = 5
    """Stop the run after this many consecutive steps with NaN/inf loss or grad norm (>= 1)."""
    exit_on_signal: bool = True
    """On SIGTERM/SIGUSR1: save a checkpoint (if ``save``) and exit cleanly."""


RECOMPUTE_GRANULARITIES = ("full", "selective")
RECOMPUTE_METHODS = ("uniform", "block")
RECOMPUTE_MODULE_NAMES = ("core_attn", "gdn", "mlp", "layernorm")  # layers/recompute.py


@dataclass
class RecomputeConfig:
    """Activation recompute (Megatron-LM's --recompute-* flags): activations dropped in the
    forward and recomputed in the backward, trading compute for memory. docs/training.md,
    "Activation recompute", says what each setting recomputes and costs."""

    granularity: str | None = None
    """None (off) | full (whole blocks: only each checkpointed chunk's input is kept) | selective
    (only the parts named in ``modules``)."""
    method: str | None = None
    """With granularity full, required: uniform (the blocks of each pipeline stage in groups of
    ``num_layers``, each group's input kept) | block (only the first ``num_layers`` blocks of
    each pipeline stage recomputed, the rest keep their activations)."""
    num_layers: int | None = None
    """With granularity full, required: blocks (a mixer + its MLP, i.e. model.num_layers units)
    per recompute group (uniform) or blocks recomputed per pipeline stage (block); 1 to the
    blocks of one (virtual) pipeline stage."""
    modules: list[str] | None = None
    """With granularity selective: any of core_attn (attention core), gdn (GDN short convs +
    chunked delta rule), mlp (SwiGLU MLP), layernorm (block RMSNorms). None = [core_attn]
    (Megatron's default)."""

    def selective_modules(self) -> frozenset[str]:
        """The parts the layers recompute themselves (empty unless granularity selective)."""
        if self.granularity != "selective":
            return frozenset()
        return frozenset(self.modules if self.modules is not None else ["core_attn"])

    def transformer_config_kwargs(self) -> dict:
        """megatron-core TransformerConfig fields (full granularity only: its HybridStack runs
        the checkpointed chunks). ``num_layers`` counts blocks; the stack's layers are
        sub-layers (mixer, MLP), two per block."""
        if self.granularity != "full":
            return {}
        return dict(
            recompute_granularity="full",
            recompute_method=self.method,
            recompute_num_layers=2 * self.num_layers,
        )

    def describe(self) -> str:
        if self.granularity is None:
            return "off"
        if self.granularity == "full":
            if self.method == "uniform":
                return (
                    f"full, uniform: every group of {self.num_layers} block(s) recomputed from "
                    "its input"
                )
            return (
                f"full, block: the first {self.num_layers} block(s) of each pipeline stage "
                "recomputed from their inputs"
            )
        return "selective: " + ", ".join(sorted(self.selective_modules()))


def check_recompute(run, segment_blocks: list[int]) -> None:
    """Megatron's rules for the --recompute-* flags, as errors naming the flags.
    ``segment_blocks``: blocks in each (virtual) pipeline stage."""
    r = run.recompute
    gran, method = field_label("recompute.granularity"), field_label("recompute.method")
    num, mods = field_label("recompute.num_layers"), field_label("recompute.modules")
    if r.granularity not in (None, *RECOMPUTE_GRANULARITIES):
        raise ConfigError(
            f"{gran}={r.granularity!r}: use {' or '.join(RECOMPUTE_GRANULARITIES)} (or leave it "
            "unset: no recompute)"
        )
    if r.method is not None and r.method not in RECOMPUTE_METHODS:
        raise ConfigError(f"{method}={r.method!r}: use {' or '.join(RECOMPUTE_METHODS)}")
    if r.method is not None and r.granularity != "full":
        raise ConfigError(
            f"{method}={r.method!r} applies to --recompute-granularity full only (got "
            f"{r.granularity!r}); selective recompute names its parts with --recompute-modules"
        )
    if r.num_layers is not None and r.granularity != "full":
        raise ConfigError(
            f"{num}={r.num_layers!r} applies to --recompute-granularity full only (got "
            f"{r.granularity!r})"
        )
    if r.modules is not None and r.granularity != "selective":
        raise ConfigError(
            f"{mods}={r.modules!r} applies to --recompute-granularity selective only (got "
            f"{r.granularity!r}); full recompute recomputes whole blocks"
        )
    if r.granularity == "full":
        if r.method is None:
            raise ConfigError(
                f"--recompute-granularity full needs {method}: uniform or block (as Megatron)"
            )
        most = max(segment_blocks)
        if r.num_layers is None or not 1 <= r.num_layers <= most:
            raise ConfigError(
                f"--recompute-granularity full needs {num} between 1 and the blocks of one "
                f"pipeline stage ({most}); got {r.num_layers!r}"
            )
    if r.granularity == "selective":
        modules = r.modules if r.modules is not None else ["core_attn"]
        unknown = [m for m in modules if m not in RECOMPUTE_MODULE_NAMES]
        if unknown or not modules:
            raise ConfigError(
                f"{mods}={r.modules!r}: "
                + (f"unknown module(s) {unknown}; " if unknown else "name at least one; ")
                + f"choose from {', '.join(RECOMPUTE_MODULE_NAMES)}"
            )
        if "mlp" in modules and run.train.fp8_format:
            # our selective checkpoint would rerun the MLP's FP8 GEMMs outside TE's FP8-aware
            # checkpoint (a second amax update per step under delayed scaling)
            raise ConfigError(
                f"{mods} mlp with --fp8-format: not supported yet (the MLP's FP8 GEMMs would be "
                "recomputed outside Transformer Engine's FP8-aware checkpoint); use "
                "--recompute-granularity full, or the other modules"
            )


# Numeric fields and the range each accepts (the field docstrings say the same). Checked by
# RunConfig.validate before anything is built, so a typo never reaches a division by zero, a
# silent no-op run or an assert deep inside megatron.
_AT_LEAST_1 = ">= 1"
_AT_LEAST_0 = ">= 0"
_POSITIVE = "> 0"
_UNIT = "in [0, 1)"
NUMERIC_RULES: dict[str, str] = {
    "parallel.tensor": _AT_LEAST_1,
    "parallel.pipeline": _AT_LEAST_1,
    "parallel.virtual_pipeline": _AT_LEAST_1,
    "parallel.context": _AT_LEAST_1,
    "data.seq_length": _AT_LEAST_1,
    "data.vocab_size": _AT_LEAST_1,
    "data.make_vocab_size_divisible_by": _AT_LEAST_1,
    "data.num_workers": _AT_LEAST_0,
    "optim.lr": _AT_LEAST_0,
    "optim.min_lr": _AT_LEAST_0,
    "optim.warmup_iters": _AT_LEAST_0,
    "optim.decay_iters": _AT_LEAST_1,
    "optim.wsd_decay_iters": _AT_LEAST_1,
    "optim.weight_decay": _AT_LEAST_0,
    "optim.adam_beta1": _UNIT,
    "optim.adam_beta2": _UNIT,
    "optim.adam_eps": _POSITIVE,
    "optim.clip_grad": _AT_LEAST_0,
    "optim.z_loss": _AT_LEAST_0,
    "train.micro_batch_size": _AT_LEAST_1,
    "train.global_batch_size": _AT_LEAST_1,
    "train.train_iters": _AT_LEAST_1,
    "train.exit_interval": _AT_LEAST_1,
    "train.seed": _AT_LEAST_0,
    "train.log_interval": _AT_LEAST_1,
    "train.eval_interval": _AT_LEAST_1,
    "train.eval_iters": _AT_LEAST_1,
    "train.save_interval": _AT_LEAST_1,
    "train.keep_last_checkpoints": _AT_LEAST_1,
    "train.max_consecutive_nan": _AT_LEAST_1,
    "train.gpu_memory_gib": _POSITIVE,
    "train.fp8_margin": _AT_LEAST_0,
    "train.fp8_amax_history_len": _AT_LEAST_1,
    "train.num_layers_at_start_in_bf16": _AT_LEAST_0,
    "train.num_layers_at_end_in_bf16": _AT_LEAST_0,
    "recompute.num_layers": _AT_LEAST_1,
}


def _in_range(value, rule: str) -> bool:
    # written so that NaN fails every rule
    if isinstance(value, float) and not math.isfinite(value):
        return False
    if rule == _AT_LEAST_1:
        return value >= 1
    if rule == _AT_LEAST_0:
        return value >= 0
    if rule == _POSITIVE:
        return value > 0
    return 0 <= value < 1


def field_label(dotted: str) -> str:
    """``--micro-batch-size (train.micro_batch_size)``: the Megatron flag users typed, if any."""
    from megatron_hybrid.training.cli import MEGATRON_FLAGS  # (cli imports this module)

    flags = [f for f, (dest, kind) in MEGATRON_FLAGS.items() if dest == dotted and kind is not True]
    return f"{flags[0]} ({dotted})" if flags else dotted


def _bad(dotted: str, value, need: str) -> ConfigError:
    return ConfigError(f"{field_label(dotted)}={value!r}: must be {need}")


def check_numbers(run) -> None:
    """Every numeric field in its range (``NUMERIC_RULES``)."""
    for dotted, rule in NUMERIC_RULES.items():
        section, name = dotted.split(".")
        value = getattr(getattr(run, section), name)
        if value is None:
            continue  # optional fields: None means the documented default
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _bad(dotted, value, "a number")
        if not _in_range(value, rule):
            raise _bad(dotted, value, rule)
    if run.train.seed >= 2**32:
        raise _bad("train.seed", run.train.seed, "< 2**32 (numpy's seed range)")
    check_split(run.data.split)


def check_schedule(run) -> None:
    """The LR schedule's relations megatron's OptimizerParamScheduler asserts on, as errors.
    Called where the schedule is built (and by --dry-run), after the layout checks, so a bad
    layout is named first."""
    o, t = run.optim, run.train
    if o.min_lr > o.lr:
        raise _bad("optim.min_lr", o.min_lr, f"<= --lr ({o.lr})")
    decay_iters = o.decay_iters or t.train_iters
    if o.warmup_iters >= decay_iters:
        raise _bad(
            "optim.warmup_iters",
            o.warmup_iters,
            f"< the decay length {decay_iters} (--lr-decay-iters, default --train-iters)",
        )
    if o.wsd_decay_iters is not None and o.wsd_decay_iters > decay_iters:
        raise _bad("optim.wsd_decay_iters", o.wsd_decay_iters, f"<= the decay length {decay_iters}")


def config_warnings(run) -> list[str]:
    """Legal but almost certainly unintended settings, printed as ``warning:`` lines."""
    out = []
    if run.optim.lr == 0:
        out.append("warning: --lr 0: the optimizer will not change the weights")
    return out


OPTIMIZER_DTYPES = {
    "main_params_dtype": ("fp32", "fp16"),
    "exp_avg_dtype": ("fp32", "fp16", "bf16", "fp8"),
    "exp_avg_sq_dtype": ("fp32", "fp16", "bf16", "fp8"),
}


def check_optimizer_dtypes(run) -> None:
    """megatron's precision-aware optimizer rules as errors before anything is built: known
    dtype names, lower-precision states only with the flag, and the flag only with the
    distributed optimizer (megatron asserts both)."""
    o = run.optim
    for name, allowed in OPTIMIZER_DTYPES.items():
        value = getattr(o, name)
        if value not in allowed:
            raise _bad(f"optim.{name}", value, f"one of {', '.join(allowed)}")
        if value != "fp32" and not o.precision_aware_optimizer:
            raise ConfigError(
                f"{field_label(f'optim.{name}')}={value}: lower-precision optimizer state needs "
                "--use-precision-aware-optimizer"
            )
    if o.precision_aware_optimizer and not run.parallel.distributed_optimizer:
        raise ConfigError(
            "--use-precision-aware-optimizer needs --use-distributed-optimizer (megatron keeps "
            "the reduced-precision states in its sharded optimizer; it works at any DP size)"
        )


FP8_FORMATS = ("e4m3", "hybrid")
FP8_RECIPES = ("delayed", "tensorwise", "blockwise", "mxfp8")
FP8_AMAX_ALGOS = ("max", "most_recent")
FP8_NEEDS_TE = "FP8 needs --spec te and Transformer Engine on a GPU"


def fp8_recipe(run) -> str | None:
    """The run's FP8 recipe name (None = no FP8); ``--fp8-recipe`` defaults to delayed."""
    t = run.train
    return (t.fp8_recipe or "delayed") if t.fp8_format else None


def fp8_bf16_blocks(run) -> set[int]:
    """Indices of the blocks kept in bf16 by ``--first-last-layers-bf16`` (empty without)."""
    t, n = run.train, run.model.num_layers
    if not (t.fp8_format and t.first_last_layers_bf16):
        return set()
    return set(range(min(t.num_layers_at_start_in_bf16, n))) | set(
        range(max(n - t.num_layers_at_end_in_bf16, 0), n)
    )


def fp8_align(recipe: str) -> int:
    """Width every FP8 GEMM dimension must be a multiple of (megatron's get_fp8_align_size)."""
    return 32 if recipe == "mxfp8" else 16


def check_fp8(run) -> None:
    """The FP8 flags as errors before anything is built: known names, the options that only mean
    something with --fp8-format, the te spec, the distributed optimizer for --fp8-param-gather,
    megatron's rules for bf16 first/last blocks, and every FP8 GEMM width (and the tokens per
    micro-batch) divisible by TE's alignment. What needs the GPU (TE importable, the recipe
    supported by this device) is checked at setup by ``preflight.check_fp8_environment``."""
    t, p, m = run.train, run.parallel, run.model
    if not t.fp8_format:
        for name, flag in (
            ("fp8_recipe", "--fp8-recipe"),
            ("fp8_param_gather", "--fp8-param-gather"),
            ("first_last_layers_bf16", "--first-last-layers-bf16"),
        ):
            if getattr(t, name):
                raise ConfigError(f"{flag} needs --fp8-format (e4m3 or hybrid)")
        return
    if t.fp8_format not in FP8_FORMATS:
        raise _bad("train.fp8_format", t.fp8_format, f"one of {', '.join(FP8_FORMATS)}")
    recipe = fp8_recipe(run)
    if recipe not in FP8_RECIPES:
        raise _bad("train.fp8_recipe", t.fp8_recipe, f"one of {', '.join(FP8_RECIPES)}")
    if t.fp8_amax_compute_algo not in FP8_AMAX_ALGOS:
        raise _bad(
            "train.fp8_amax_compute_algo", t.fp8_amax_compute_algo, " or ".join(FP8_AMAX_ALGOS)
        )
    if t.spec == "local":
        raise ConfigError(f"--fp8-format {t.fp8_format} with --spec local: {FP8_NEEDS_TE}")
    if t.precision == "fp32":
        raise ConfigError(
            f"--fp8-format {t.fp8_format} with --fp32: FP8 training keeps bf16 weights and "
            "activations around the FP8 GEMMs (use --bf16 or the default precision)"
        )
    if t.fp8_param_gather and not p.distributed_optimizer:
        raise ConfigError(
            "--fp8-param-gather needs --use-distributed-optimizer (megatron keeps the FP8 "
            "weights' high-precision master copy in the sharded optimizer)"
        )
    if t.first_last_layers_bf16:
        if recipe == "delayed":
            raise ConfigError(
                "--first-last-layers-bf16 does not work with --fp8-recipe delayed (TE reduces "
                "delayed-scaling amaxes per autocast region; megatron refuses the mix): use "
                "tensorwise or blockwise"
            )
        per_stage = m.num_layers // p.pipeline
        for name in ("num_layers_at_start_in_bf16", "num_layers_at_end_in_bf16"):
            if getattr(t, name) > per_stage:
                raise _bad(
                    f"train.{name}",
                    getattr(t, name),
                    f"<= the blocks per pipeline stage ({per_stage})",
                )
        if len(fp8_bf16_blocks(run)) >= m.num_layers:
            raise ConfigError(
                f"--first-last-layers-bf16 with {t.num_layers_at_start_in_bf16} + "
                f"{t.num_layers_at_end_in_bf16} bf16 blocks leaves none of the "
                f"{m.num_layers} blocks in FP8"
            )
    align = fp8_align(recipe)
    problems = m.fp8_alignment_problems(p.tensor, align)
    if problems:
        raise ConfigError(
            f"--fp8-format: Transformer Engine's FP8 GEMMs need every width divisible by {align}, "
            f"and these are not at TP {p.tensor}: {'; '.join(problems)}. Choose widths (head "
            "counts/dims, hidden or intermediate size) whose per-rank products are multiples of "
            f"{align}; no GEMM is silently run in bf16 instead"
        )
    tokens = t.micro_batch_size * run.data.seq_length // p.context
    if tokens % align:
        raise ConfigError(
            f"--fp8-format: the tokens of one micro-batch per context-parallel rank (micro-batch "
            f"{t.micro_batch_size} x seq {run.data.seq_length} / CP {p.context} = {tokens}) must "
            f"be a multiple of {align} for Transformer Engine's FP8 GEMMs"
        )


def check_split(split: str) -> list[float]:
    """``99,1,0`` (or ``99/1/0``) -> weights; up to three non-negative numbers with a positive
    train weight (megatron's parser would skip what it cannot read and divide by a zero sum)."""
    parts = [x.strip() for x in re.split(r"[,/]", str(split))]
    if not 1 <= len(parts) <= 3 or not all(re.fullmatch(r"\d+(\.\d*)?|\.\d+", x) for x in parts):
        raise _bad("data.split", split, "up to three comma-separated non-negative numbers")
    weights = [float(x) for x in parts]
    if weights[0] <= 0:
        raise _bad("data.split", split, "a positive train weight (the first number)")
    return weights + [0.0] * (3 - len(weights))


def check_rampup(rampup, global_batch: int, micro_batch: int, dp: int) -> None:
    """Megatron's --rampup-batch-size rules, with every batch size on the ramp divisible by
    micro-batch x DP (checked here rather than at the step where it appears)."""
    flag = field_label("train.rampup_batch_size")
    if len(rampup) != 3 or any(isinstance(x, bool) or not isinstance(x, int) for x in rampup):
        raise ConfigError(f"{flag}={rampup!r}: give three integers START INCREMENT SAMPLES")
    start, inc, samples = rampup
    if start < 1 or inc < 1 or samples < 0:
        raise ConfigError(f"{flag}={rampup!r}: START and INCREMENT must be >= 1 and SAMPLES >= 0")
    if start > global_batch or (global_batch - start) % inc:
        raise ConfigError(
            f"{flag}={rampup!r}: --global-batch-size {global_batch} minus START {start} must be "
            f"a non-negative multiple of INCREMENT {inc}"
        )
    unit = micro_batch * dp
    bad = [b for b in range(start, global_batch + 1, inc) if b % unit]
    if bad:
        raise ConfigError(
            f"{flag}={rampup!r}: batch sizes {bad[:5]} on the ramp are not divisible by "
            f"micro_batch_size {micro_batch} x data-parallel size {dp} = {unit}"
        )


@dataclass
class RunConfig:
    preset: str = "tiny"
    """Model preset the ``model`` section started from."""
    model: OlmoHybridConfig = field(default_factory=OlmoHybridConfig)
    hybrid_layer_pattern: str | None = None
    """Override of the block pattern, may carry '|' pipeline boundaries (e.g. G-G-|G-*-)."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    """A generated expressivity task as the data (``--synthetic-task``; data/synthetic.py)."""
    recompute: RecomputeConfig = field(default_factory=RecomputeConfig)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["model"] = self.model.to_dict()
        return d

    def validate(self, world_size: int, require_data: bool = True) -> None:
        """Reject impossible setups before anything is built, naming the numbers.
        ``require_data=False``: everything but the presence of training data (--dry-run)."""
        check_numbers(self)
        p, t = self.parallel, self.train
        model_ranks = p.tensor * p.pipeline * p.context
        if world_size % model_ranks:
            raise ConfigError(
                f"world size {world_size} is not divisible by TP({p.tensor}) x PP({p.pipeline}) x "
                f"CP({p.context}) = {model_ranks}"
            )
        dp = world_size // model_ranks
        if t.global_batch_size % (t.micro_batch_size * dp):
            raise ConfigError(
                f"global_batch_size={t.global_batch_size} is not divisible by micro_batch_size="
                f"{t.micro_batch_size} x data-parallel size {dp}"
            )
        if t.rampup_batch_size is not None:
            check_rampup(t.rampup_batch_size, t.global_batch_size, t.micro_batch_size, dp)
        if p.sequence_parallel and p.tensor == 1:
            raise ConfigError("sequence_parallel needs tensor parallel size > 1")
        self.model.check_parallel(p.tensor)
        if self.data.seq_length % (p.tensor if p.sequence_parallel else 1):
            raise ConfigError(
                f"seq_length={self.data.seq_length} is not divisible by TP={p.tensor} "
                "(needed by sequence parallelism)"
            )
        m = self.model
        if m.rope_theta is not None and self.data.seq_length > m.max_position_embeddings:
            raise ConfigError(
                f"--seq-length {self.data.seq_length} exceeds --max-position-embeddings "
                f"{m.max_position_embeddings} (model.max_position_embeddings, the positions this "
                "RoPE model is built for): raise it or train shorter sequences"
            )
        check_fp8(self)
        if self.optim.decay_style.lower() not in ("cosine", "linear", "wsd", "constant"):
            raise ConfigError(
                f"decay_style={self.optim.decay_style!r}: use cosine, linear, WSD or constant"
            )
        if t.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"precision={t.precision!r}: use auto, bf16 or fp32")
        if t.lm_head_loss_chunk_tokens < 0:
            raise ConfigError(
                f"--lm-head-loss-chunk-tokens {t.lm_head_loss_chunk_tokens}: must be >= 0 "
                "(0 = the unfused output layer)"
            )
        check_optimizer_dtypes(self)
        self.synthetic.check(self.data.seq_length)
        check_recompute(self, self.blocks_per_segment())
        if require_data and not (self.data.mock or self.data.data_path or self.synthetic.task):
            raise ConfigError("no training data: give --data-path PREFIX (or --mock-data)")

    def blocks_per_segment(self) -> list[int]:
        """Blocks in each (virtual) pipeline stage: by the '|' of the layer pattern, else the
        even split."""
        p = self.parallel
        segments = p.pipeline * (p.virtual_pipeline or 1)
        pattern = self.hybrid_layer_pattern
        if pattern and "|" in pattern:
            return [sum(seg.count(c) for c in "G*") for seg in pattern.split("|")]
        return [math.ceil(self.model.num_layers / segments)] * segments

    def data_parallel_size(self, world_size: int) -> int:
        p = self.parallel
        return world_size // (p.tensor * p.pipeline * p.context)
