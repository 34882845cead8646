"""What an expressivity grid is made of: its tasks (lengths and options) and its settings.
Shared by the runner (science/expressivity.py) and its report (science/expressivity_report.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_hybrid.science.architectures import ModelShape


@dataclass(frozen=True)
class TaskSpec:
    """One task of the grid: training lengths, test lengths and task options."""

    task: str
    train_length: int
    train_min_length: int
    eval_lengths: tuple[int, ...]
    options: tuple[tuple[str, int], ...] = ()
    """SyntheticConfig fields (state_recall_bits, mqar_num_keys, ...)."""

    def seq_length(self) -> int:
        from megatron_hybrid.data.synthetic import SyntheticConfig

        return (
            SyntheticConfig(task=self.task, **dict(self.options)).build().seq_len(self.train_length)
        )


@dataclass
class GridConfig:
    """One expressivity grid: every task x architecture x seed is a training run (a cell)."""

    tasks: dict[str, TaskSpec]
    """Task name -> lengths and options (REAL_TASKS or TOY_TASKS)."""
    archs: list[str]
    """Architecture names of ``architectures()`` (equal parameter counts by MLP width)."""
    seeds: list[int]
    """Seeds per cell (model init and data)."""
    shape: ModelShape = field(default_factory=ModelShape)
    """Widths and depth shared by every architecture."""
    train_iters: int = 2000
    """Optimizer steps per cell."""
    global_batch_size: int = 64
    """Examples per step (one micro-batch)."""
    lr: float = 1e-3
    """Peak learning rate (cosine to lr / 10 after warm-up)."""
    warmup_iters: int = 100
    """Linear warm-up steps."""
    eval_examples: int = 512
    """Test examples per evaluation length."""
    eval_batch_size: int = 64
    """Examples per evaluation forward."""
    precision: str = "fp32"
    """Trainer precision (``--fp32`` / ``--bf16``). fp32 by default: these models are tiny and
    launch-bound, so bf16 buys no speed, while state tracking over 8x the trained length is
    exactly where bf16 rounding of the GDN state could pass for an architecture's limit. On
    CUDA it also keeps the GDN heads (K 32) on our Triton kernels, which are guarded off for
    16-bit inputs at K <= 32 (docs/kernels.md, "Known faults")."""
