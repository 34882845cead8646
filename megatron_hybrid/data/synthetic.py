"""A synthetic task as the trainer's data source: config section ``synthetic`` + datasets.

    megatron-hybrid-train --synthetic-task parity --synthetic-train-length 64 \\
        --synthetic-eval-lengths 64 256 --seq-length 64 --eval-interval 500 ...

Each sample is one example right-padded to ``--seq-length`` (PAD tokens with loss mask 0, so
only answer positions are trained on); the vocabulary is the task's (padded as Megatron pads,
the last id serves as the never-seen EOD). Evaluation (training/task_accuracy.py) reports accuracy at
every ``eval_lengths`` entry next to the validation loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_hybrid.data.synthetic_tasks import (
    TASK_NAMES,
    TRAIN_STREAM,
    VALID_STREAM,
    Task,
    build_task,
    example_rng,
    padded,
)
from megatron_hybrid.errors import ConfigError


@dataclass
class SyntheticConfig:
    task: str | None = None
    """parity | s5 | a5 | mqar | state_recall: train on this generated task instead of
    ``data.data_path`` (None = off). See megatron_hybrid/data/synthetic_tasks.py for the formats."""
    train_length: int = 16
    """The task's size parameter for training (bits, group elements, key-value pairs, swaps);
    the longest training example. ``data.seq_length`` must hold an example of this length."""
    train_min_length: int | None = None
    """Training lengths are drawn uniformly from [train_min_length, train_length] per example
    (None = always train_length). Mixed lengths help recurrent models generalise in length."""
    eval_lengths: list[int] = field(default_factory=list)
    """Lengths accuracy is reported at on every evaluation (default: train_length). Longer than
    train_length measures length generalisation."""
    eval_examples: int = 256
    """Test examples per length (fresh ones, from a stream training never reads)."""
    eval_batch_size: int = 32
    """Examples per forward pass in the accuracy evaluation (lower it for long lengths)."""
    state_recall_bits: int = 16
    """state_recall: number of bits m (fixed across lengths; the length is the swap count)."""
    state_recall_addressed: bool = False
    """state_recall: write each bit after its address token (``i b_i``), so the final lookup is
    by content; False is the spec's bare ``b_0..b_{m-1}``, looked up by absolute position."""
    state_recall_queries: int = 1
    """state_recall: names queried at the end, each answered (1..5; 1 = the spec's ``QUERY a``).
    More queries give more labels per example for the same lookup machinery."""
    mqar_num_keys: int = 64
    """mqar: size of the key vocabulary (>= the largest number of pairs evaluated)."""
    mqar_num_values: int = 64
    """mqar: size of the value vocabulary."""

    def build(self) -> Task:
        return build_task(
            self.task,
            state_recall_bits=self.state_recall_bits,
            state_recall_addressed=self.state_recall_addressed,
            state_recall_queries=self.state_recall_queries,
            mqar_num_keys=self.mqar_num_keys,
            mqar_num_values=self.mqar_num_values,
        )

    def lengths(self) -> list[int]:
        return list(self.eval_lengths) or [self.train_length]

    def check(self, seq_length: int) -> None:
        """ConfigError naming the flag for anything the datasets would trip over."""
        if not self.task:
            return
        if self.task not in TASK_NAMES:
            raise ConfigError(
                f"--synthetic-task {self.task!r}: choose one of {', '.join(TASK_NAMES)}"
            )
        lo = self.train_min_length if self.train_min_length is not None else self.train_length
        if not 0 <= lo <= self.train_length:
            raise ConfigError(
                f"synthetic.train_min_length={lo}: must be in [0, train_length {self.train_length}]"
            )
        for name in ("eval_examples", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"synthetic.{name}={getattr(self, name)}: must be >= 1")
        try:
            task = self.build()
            for n in {lo, self.train_length, *self.lengths()}:
                if n or self.task == "state_recall":
                    task.check_length(n)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        need = task.seq_len(self.train_length)
        if seq_length < need:
            raise ConfigError(
                f"--seq-length {seq_length} is shorter than a {self.task} example of training "
                f"length {self.train_length} ({need} tokens): use --seq-length {need}"
            )


class SyntheticTaskDataset:
    """``num_samples`` training (or validation) examples of ``task``, sample i a function of
    (seed, stream, i) only; lengths uniform in [min_length, max_length]."""

    def __init__(self, task: Task, seed: int, stream: int, num_samples: int, seq_length: int,
                 min_length: int, max_length: int):  # fmt: skip
        self.task, self.seed, self.stream, self.n = task, seed, stream, num_samples
        self.seq_length, self.lo, self.hi = seq_length, min_length, max_length

    def __len__(self):
        return self.n

    def __getitem__(self, idx: int) -> dict:
        rng = example_rng(self.seed, self.stream, int(idx))
        length = int(rng.integers(self.lo, self.hi + 1))
        if length == 0 and self.task.name != "state_recall":
            length = 1
        return padded(self.task.example(rng, length), self.seq_length, self.task.pad)


def build_task_datasets(cfg: SyntheticConfig, seq_length: int, seed: int, train_samples: int,
                        eval_samples: int):  # fmt: skip
    """(train, valid): validation draws training-length examples from another stream."""
    cfg.check(seq_length)
    task = cfg.build()
    lo = cfg.train_min_length if cfg.train_min_length is not None else cfg.train_length
    train = SyntheticTaskDataset(
        task, seed, TRAIN_STREAM, train_samples, seq_length, lo, cfg.train_length
    )
    valid = SyntheticTaskDataset(
        task, seed, VALID_STREAM, max(eval_samples, 1), seq_length, lo, cfg.train_length
    )
    return train, valid


def task_vocab_size(cfg: SyntheticConfig) -> int:
    """Tokens the task uses, plus one: the id after them is the (never emitted) EOD."""
    return cfg.build().vocab_size + 1
