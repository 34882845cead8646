"""The run config: one dataclass per component, the single source of truth for a training run.

Built from a preset, an optional YAML file, Megatron-style flags (``--tensor-model-parallel-size
2``) and ``section.field=value`` overrides, in that order (later wins); see cli.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from megatron_hybrid.models.olmo_hybrid.config import ConfigError, OlmoHybridConfig


@dataclass
class ParallelConfig:
    tensor: int = 1
    """Tensor-parallel size. Splits heads and MLP columns; must divide every head count."""
    pipeline: int = 1
    """Pipeline-parallel size. Splits the block pattern into consecutive stages."""
    virtual_pipeline: int | None = None
    """Virtual stages per pipeline rank (interleaved 1F1B); None = plain 1F1B."""
    context: int = 1
    """Context-parallel size. Splits each sequence; GDN passes recurrent state between shards."""
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
    """train,valid,test weights over documents of each dataset."""
    seq_length: int = 1024
    """Tokens per training sequence."""
    tokenizer_type: str | None = None
    """SentencePieceTokenizer | HuggingFaceTokenizer | None (mock data / explicit vocab)."""
    tokenizer_model: str | None = None
    """Path to the sentencepiece model or HF tokenizer directory/name."""
    vocab_size: int | None = None
    """Model vocabulary; default = tokenizer size padded to ``make_vocab_size_divisible_by``."""
    make_vocab_size_divisible_by: int = 128
    """Pad the tokenizer's vocabulary up to a multiple of this (times TP), as Megatron does."""
    document_masking: bool = True
    """Pass document boundaries to the model so GDN state, conv and attention do not cross
    documents packed into one sequence. False = Olmo's 'no intra-doc masking' variant."""
    cache_dir: str | None = None
    """Where megatron's dataset index caches go (default: next to the data)."""
    num_workers: int = 0
    """DataLoader worker processes."""


@dataclass
class OptimConfig:
    lr: float = 3e-4
    """Peak learning rate."""
    min_lr: float = 3e-5
    """Final learning rate of the decay."""
    warmup_iters: int = 0
    """Linear warmup steps from 0 to ``lr``."""
    decay_style: str = "cosine"
    """cosine | linear | WSD | constant."""
    decay_iters: int | None = None
    """Steps over which the LR decays (default: train_iters)."""
    wsd_decay_iters: int | None = None
    """WSD: length of the final decay phase (default: 10% of decay_iters)."""
    weight_decay: float = 0.1
    """AdamW weight decay, not applied to embeddings, norms, A_log, dt_bias (see no_decay)."""
    decay_embeddings: bool = False
    """Apply weight decay to the embedding too (Olmo: no)."""
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    """Global gradient-norm clip (0 = off)."""
    z_loss: float = 1e-5
    """Coefficient of the z-loss (logsumexp^2 of the logits), stabilises the softmax."""


@dataclass
class TrainConfig:
    micro_batch_size: int = 1
    """Sequences per forward/backward on one rank."""
    global_batch_size: int = 8
    """Sequences per optimizer step over all data-parallel ranks (gradient accumulation fills in)."""
    train_iters: int = 100
    """Optimizer steps to run (total, across resumes)."""
    exit_interval: int | None = None
    """Stop (after saving, if ``save`` is set) when the iteration is a multiple of this; the LR
    schedule still spans ``train_iters`` (Megatron's --exit-interval)."""
    seed: int = 1234
    """Seeds model init, data order and dropout."""
    deterministic: bool = False
    """Bitwise repeatable runs (deterministic torch algorithms, fixed reduction order)."""
    precision: str = "auto"
    """auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32."""
    fp8_format: str | None = None
    """e4m3 | hybrid (FP8 training arrives with the FP8 issue; refused until then)."""
    fp8_recipe: str | None = None
    """delayed | tensorwise | ... (see fp8_format)."""
    spec: str = "auto"
    """Layer-spec flavour: auto (te on GPU with Transformer Engine, else local) | te | local."""
    log_interval: int = 1
    """Print the iteration line every N steps."""
    eval_interval: int | None = None
    """Evaluate on the validation split every N steps (None = never)."""
    eval_iters: int = 10
    """Validation micro-batches... per data-parallel rank per evaluation."""
    save: str | None = None
    """Checkpoint directory (``<save>/iter_0000100/``)."""
    load: str | None = None
    """Resume from this directory's latest checkpoint (if any)."""
    finetune: bool = False
    """With ``load``: take only the weights; iteration, optimizer states, LR schedule and data
    position start fresh (e.g. a long-context stage from the pretrained model; Megatron's
    --finetune)."""
    no_load_optim: bool = False
    """With ``load``: take weights, LR schedule, iteration and data position from the checkpoint
    but start the optimizer states (Adam moments) fresh, e.g. to switch the distributed
    optimizer on or off (Megatron's --no-load-optim)."""
    save_interval: int | None = None
    """Save every N steps (and at the end when ``save`` is set)."""
    ckpt_format: str = "torch_dist"
    """megatron-core dist checkpointing format (torch_dist)."""
    tensorboard_dir: str | None = None
    wandb_project: str | None = None
    max_consecutive_nan: int = 5
    """Stop the run after this many consecutive steps with NaN/inf loss or grad norm."""
    exit_on_signal: bool = True
    """On SIGTERM/SIGUSR1: save a checkpoint (if ``save``) and exit cleanly."""


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

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["model"] = self.model.to_dict()
        return d

    def validate(self, world_size: int) -> None:
        """Reject impossible setups before anything is built, naming the numbers."""
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
        if p.sequence_parallel and p.tensor == 1:
            raise ConfigError("sequence_parallel needs tensor parallel size > 1")
        self.model.check_parallel(p.tensor)
        if self.data.seq_length % (p.tensor if p.sequence_parallel else 1):
            raise ConfigError(
                f"seq_length={self.data.seq_length} is not divisible by TP={p.tensor} "
                "(needed by sequence parallelism)"
            )
        if t.fp8_format or t.fp8_recipe:
            raise ConfigError("fp8_format/fp8_recipe: FP8 training is not supported yet")
        if self.optim.decay_style.lower() not in ("cosine", "linear", "wsd", "constant"):
            raise ConfigError(
                f"decay_style={self.optim.decay_style!r}: use cosine, linear, WSD or constant"
            )
        if t.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"precision={t.precision!r}: use auto, bf16 or fp32")
        if not self.data.mock and not self.data.data_path:
            raise ConfigError("no training data: give --data-path PREFIX (or --mock-data)")

    def data_parallel_size(self, world_size: int) -> int:
        p = self.parallel
        return world_size // (p.tensor * p.pipeline * p.context)
