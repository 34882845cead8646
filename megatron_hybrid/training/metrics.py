"""Megatron's iteration line (byte-compatible prefix; tokens/s/GPU and MFU appended), the
startup banner, and TensorBoard / W&B sinks."""

from __future__ import annotations

import datetime


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
