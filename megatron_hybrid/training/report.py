"""Human-readable run summary: parallel layout, parameters by layer type, FLOPs/token split.
Printed by ``--dry-run`` (no model is allocated) and as the startup banner."""

from __future__ import annotations

import json

from megatron_hybrid.training.config import fp8_bf16_blocks, fp8_recipe
from megatron_hybrid.training.flops import flops_per_token, gemm_precision_split

# megatron's --fp8-recipe names -> Transformer Engine recipe classes
_TE_RECIPES = {
    "delayed": "DelayedScaling",
    "tensorwise": "Float8CurrentScaling",
    "blockwise": "Float8BlockScaling",
    "mxfp8": "MXFP8BlockScaling",
}


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
    o = run.optim
    state = (
        f"precision-aware: master {o.main_params_dtype}, exp_avg {o.exp_avg_dtype}, "
        f"exp_avg_sq {o.exp_avg_sq_dtype}"
        if o.precision_aware_optimizer
        else "fp32 master weights and Adam moments"
    )
    lines.append(
        f"optimizer: Adam, {state} | gradient accumulation fusion "
        f"{'on (te linears)' if t.gradient_accumulation_fusion else 'off'}"
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
    lines += fp8_lines(run)
    return "\n".join(lines)


def fp8_lines(run) -> list[str]:
    """The FP8 plan: recipe, which GEMMs run in FP8 and which stay bf16 (and why), and the FP8
    share of the step's GEMM FLOPs (training/flops.py). Empty without ``--fp8-format``."""
    recipe = fp8_recipe(run)
    if recipe is None:
        return []
    t, m = run.train, run.model
    bf16_blocks = fp8_bf16_blocks(run)
    scaling = (
        f", margin {t.fp8_margin}, amax history {t.fp8_amax_history_len} "
        f"({t.fp8_amax_compute_algo})"
        if recipe == "delayed"
        else ""
    )
    lines = [
        f"FP8: format {t.fp8_format}, recipe {recipe} (Transformer Engine "
        f"{_TE_RECIPES[recipe]}{scaling}) | FP8 weights + param all-gather "
        f"{'on' if t.fp8_param_gather else 'off'} | bf16 blocks: "
        + (", ".join(str(i) for i in sorted(bf16_blocks)) if bf16_blocks else "none")
    ]
    split = gemm_precision_split(m, run.data.seq_length, bf16_blocks)
    lines.append(
        f"  {'GEMM (widths at TP 1: out x in)':<52} {'FP8':>4} {'bf16':>4} "
        f"{'FP8 FLOPs/tok':>13} {'bf16 FLOPs/tok':>14}"
    )
    notes = []
    for r in split["gemms"]:
        label = f"{r['name']} ({r['rows']} x {r['cols']})"
        lines.append(
            f"  {label:<52} {r['fp8_layers']:>4} {r['bf16_layers']:>4} "
            f"{r['fp8_flops']:>13.4e} {r['bf16_flops']:>14.4e}"
        )
        if r["note"]:
            notes.append(f"  {r['name']}: {r['note']}")
    lines.append(
        f"  FP8 share: {100.0 * split['fp8_share_of_gemms']:.1f}% of the GEMM FLOPs, "
        f"{100.0 * split['fp8_share_of_step']:.1f}% of the step's FLOPs"
    )
    lines += notes
    lines.append(
        "  never FP8 (not GEMMs of weights): GDN conv, GDN recurrence (no FP8 GDN core exists), "
        "decay/beta math, norms, attention core (TE attention in bf16), embedding, loss"
    )
    return lines
