"""Human-readable run summary: parallel layout, parameters by layer type, FLOPs/token split.
Printed by ``--dry-run`` (no model is allocated) and as the startup banner."""

from __future__ import annotations

import json

from megatron_hybrid.training.flops import flops_per_token


def describe(
    run,
    world_size: int,
    flavour: str | None = None,
    num_microbatches: int | None = None,
    show_config: bool = False,
) -> str:
    p, t, m = run.parallel, run.train, run.model
    dp = run.data_parallel_size(world_size)
    nmb = num_microbatches or t.global_batch_size // (t.micro_batch_size * dp)
    lines = []
    if show_config:
        lines += ["resolved config:", json.dumps(run.to_dict(), indent=2, default=str), ""]
    lines.append(
        f"parallel layout: world {world_size} = TP {p.tensor} x PP {p.pipeline}"
        f"{f' (VP {p.virtual_pipeline})' if p.virtual_pipeline else ''} x CP {p.context} x "
        f"DP {dp} | sequence parallel {p.sequence_parallel} | distributed optimizer "
        f"{p.distributed_optimizer}" + (f" | layer spec {flavour}" if flavour else "")
    )
    lines.append(
        f"batch: global {t.global_batch_size} x seq {run.data.seq_length} = "
        f"{t.global_batch_size * run.data.seq_length:,} tokens/step | micro-batch "
        f"{t.micro_batch_size} | micro-batches per step per DP rank {nmb}"
        + (
            " | rampup from {} by {} over {:,} samples".format(*t.rampup_batch_size)
            if t.rampup_batch_size
            else ""
        )
    )
    lines.append(f"activation recompute: {run.recompute.describe()}")
    lines.append(
        f"model: {run.preset} | pattern {m.layer_pattern()} | vocab {m.vocab_size} | "
        f"RoPE {m.rope_theta if m.rope_theta else 'none (NoPE)'}"
    )
    counts = m.num_params_by_type()
    total = sum(counts.values())
    lines.append(f"parameters: {total:,} total")
    for k, v in counts.items():
        lines.append(f"  {k:<18} {v:>15,}  ({100.0 * v / total:5.1f}%)")
    fl = flops_per_token(m, run.data.seq_length)
    lines.append(f"training FLOPs/token at seq {run.data.seq_length}: {fl['total']:.4e}")
    for k, v in fl.items():
        if k != "total":
            lines.append(f"  {k:<22} {v:.4e}  ({100.0 * v / fl['total']:5.1f}%)")
    return "\n".join(lines)
