"""Megatron's iteration line (byte-compatible prefix; tokens/s/GPU and MFU appended), the
startup banner, and TensorBoard / W&B sinks."""

from __future__ import annotations

import datetime
import time


def iteration_line(
    *,
    iteration,
    train_iters,
    consumed,
    elapsed_ms,
    tflops,
    lr,
    global_batch,
    losses: dict,
    loss_scale,
    grad_norm,
    skipped,
    nan_iters,
    tokens_per_gpu_s,
    mfu,
) -> str:
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S.%f")
    s = f"[{now}] iteration {iteration:8d}/{train_iters:8d} |"
    s += f" consumed samples: {consumed:12d} |"
    s += f" elapsed time per iteration (ms): {elapsed_ms:.1f} |"
    s += f" throughput per GPU (TFLOP/s/GPU): {tflops:.1f} |"
    s += f" learning rate: {lr:.6E} |"
    s += f" global batch size: {global_batch:5d} |"
    for name, value in losses.items():
        s += f" {name}: {value:.6E} |"
    s += f" loss scale: {loss_scale:.1f} |"
    if grad_norm is not None:
        s += f" grad norm: {grad_norm:.3f} |"
    s += f" number of skipped iterations: {skipped:3d} |"
    s += f" number of nan iterations: {nan_iters:3d} |"
    s += f" tokens per GPU (tokens/s/GPU): {tokens_per_gpu_s:.1f} |"
    s += f" MFU (%): {mfu:.1f} |" if mfu is not None else " MFU (%): n/a |"
    return s


def memory_line(iteration: int, rank: int = 0, stats: dict | None = None) -> str | None:
    """Megatron's one-time memory report, so a run's measured peak can be read next to the
    banner's estimate (training/memory.py). ``stats``: ``torch.cuda.memory_stats()``-style
    byte counts; None reads the current CUDA device, and without CUDA there is no line."""
    if stats is None:
        import torch

        if not torch.cuda.is_available():
            return None
        stats = {
            "allocated": torch.cuda.memory_allocated(),
            "max allocated": torch.cuda.max_memory_allocated(),
            "reserved": torch.cuda.memory_reserved(),
            "max reserved": torch.cuda.max_memory_reserved(),
        }
    mb = 2.0**20
    body = " | ".join(f"{k}: {v / mb:.1f}" for k, v in stats.items())
    return f"[Rank {rank}] (after {iteration} iterations) memory (MB) | {body}"


class IntervalMeter:
    """What one log line reports about the steps since the previous line: seconds per step and
    the mean losses of the steps that updated the model (Megatron averages over the interval).

    The step count is what really ran since the last line, not ``--log-interval``: the first
    line after a resume and the last line of a run cover fewer steps. Time spent in evaluation
    and checkpoint saves is left out (``pause``), so throughput and MFU describe training."""

    def __init__(self, iteration: int, clock=time.monotonic):
        self.clock = clock
        self.start, self.start_iter = clock(), iteration
        self.sums: dict[str, float] = {}
        self.counted = 0

    def add(self, losses: dict, applied: bool) -> None:
        """One finished step; a skipped (NaN/inf) step's losses are not averaged in."""
        if applied:
            for k, v in losses.items():
                self.sums[k] = self.sums.get(k, 0.0) + v
            self.counted += 1

    def pause(self, seconds: float) -> None:
        """Leave ``seconds`` of non-training work (eval, save) out of the current interval."""
        self.start += seconds

    def take(self, iteration: int, last_losses: dict) -> tuple[float, dict]:
        """(seconds per step, mean losses) since the previous take; starts the next interval.
        With no applied step in the interval the last step's (non-finite) losses are shown."""
        now = self.clock()
        steps = max(1, iteration - self.start_iter)
        dt = max(now - self.start, 1e-9) / steps
        means = {k: v / self.counted for k, v in self.sums.items()} if self.counted else last_losses
        self.start, self.start_iter, self.sums, self.counted = now, iteration, {}, 0
        return dt, means


class Sinks:
    """TensorBoard and W&B writers on the logging rank (tags as Megatron-LM writes them)."""

    def __init__(self, tensorboard_dir=None, wandb_project=None, run_config=None, enabled=True):
        self.tb = self.wandb = None
        if not enabled:
            return
        if tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise RuntimeError(
                    "--tensorboard-dir needs the tensorboard package (pip install tensorboard)"
                ) from e
            self.tb = SummaryWriter(log_dir=tensorboard_dir)
        if wandb_project:
            try:
                import wandb
            except ImportError as e:
                raise RuntimeError("--wandb-project needs the wandb package") from e
            self.wandb = wandb.init(project=wandb_project, config=run_config)

    def log(self, step: int, scalars: dict):
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self):
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
