"""Human-readable run summary: parallel layout, parameters by layer type, FLOPs/token split,
per-GPU memory estimate. Printed by ``--dry-run`` (no model is allocated) and as the startup
banner."""

from __future__ import annotations

import json

from megatron_hybrid.training.config import fp8_bf16_blocks, fp8_recipe
from megatron_hybrid.training.flops import flops_per_token, gemm_precision_split
from megatron_hybrid.training.memory import (
    FIT_FRACTION,
    GIB,
    device_memory_gib,
    estimate,
    fits,
    suggestions,
)

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
    lines += memory_lines(run, world_size, spec=flavour, microbatches=nmb)
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


def _gib(x: float, unit: int = GIB) -> str:
    return f"{x / unit:.1f}"


def memory_lines(run, world_size: int, spec=None, microbatches=None, capacity_gib=None):
    """The per-GPU memory estimate (training/memory.py) as report lines: the breakdown, the
    largest activation items and, when the card's size is known (``capacity_gib``,
    --gpu-memory-gib, or a visible CUDA device), whether it fits and what would make it fit."""
    spec = spec or (run.train.spec if run.train.spec != "auto" else "te")
    st = estimate(run, world_size, spec, microbatches)
    p = run.parallel
    where = f"{len(st.blocks)} blocks"
    if p.pipeline > 1:
        where = f"pipeline stage {st.stage} of {p.pipeline}, {where}"
    plural = "es" if st.in_flight != 1 else ""
    dp_cp = run.data_parallel_size(world_size) * p.context
    unit, name = (GIB, "GiB") if st.total >= GIB else (2**20, "MiB")  # tiny models: MiB
    parts = [
        f"weights {_gib(st.weights, unit)} {name}",
        f"grads {_gib(st.grads, unit)}",
        f"optimizer {_gib(st.optimizer, unit)} ({_optimizer_note(run, dp_cp)})",
    ]
    if st.overhead:
        parts.append(f"TE wgrad buffers {_gib(st.overhead, unit)}")
    parts += [
        f"activations {_gib(st.activations, unit)} (recompute: {_recompute_label(run)}; "
        f"{st.in_flight:g} micro-batch{plural} in flight)",
        f"logits {_gib(st.logits, unit)}",
        f"temporaries {_gib(st.temporaries, unit)}",
        f"total ~{_gib(st.total, unit)} {name}",
    ]
    top = sorted(st.items.items(), key=lambda kv: -kv[1])[:4]
    lines = [
        f"memory per GPU (estimate, {spec} spec, rank with the most: {where}): "
        + " | ".join(parts),
        f"  peak at {st.peak_at}; largest activation items: "
        + ", ".join(f"{k} {_gib(v, unit)} {name}" for k, v in top),
    ]
    capacity = capacity_gib or run.train.gpu_memory_gib or device_memory_gib()
    if capacity:
        lines.append("  " + _verdict(run, world_size, st.total, capacity, spec, microbatches))
    return lines


def _optimizer_note(run, dp_cp: int) -> str:
    o = run.optim
    if run.train.precision == "fp32":
        note = "fp32 Adam moments; the fp32 weights are the master copy"
    elif o.precision_aware_optimizer:
        master = "bf16 + 16-bit remainder" if o.main_params_dtype == "fp32" else "fp16"
        note = f"master {master}, moments {o.exp_avg_dtype}/{o.exp_avg_sq_dtype}"
    else:
        note = "fp32 master + moments"
    if run.parallel.distributed_optimizer and dp_cp > 1:
        note += f", sharded over DP x CP = {dp_cp}"
    return note


def _recompute_label(run) -> str:
    r = run.recompute
    if r.granularity is None:
        return "off"
    if r.granularity == "full":
        return f"full {r.method} {r.num_layers}"
    return "selective " + " ".join(sorted(r.selective_modules()))


def _verdict(run, world_size, total, capacity, spec, microbatches) -> str:
    share = f"{100 * total / (capacity * GIB):.0f}% of the card"
    if fits(total, capacity):
        return f"fits in {capacity:.1f} GiB ({share}; {100 * (1 - FIT_FRACTION):.0f}% kept free)"
    line = (
        f"does not fit in {capacity:.1f} GiB ({share}; a run needs <= "
        f"{100 * FIT_FRACTION:.0f}%: the CUDA context and allocator fragmentation take the rest)"
    )
    tips = suggestions(run, world_size, capacity, spec, microbatches)
    if tips:
        return line + ": try " + " or ".join(f"{f} (~{_gib(b)} GiB)" for f, b in tips)
    return line + (
        ": no recompute / optimizer setting fits alone; split the model over more GPUs "
        "(--tensor-model-parallel-size with --sequence-parallel, --context-parallel-size, "
        "--pipeline-model-parallel-size) or shorten --seq-length"
    )
