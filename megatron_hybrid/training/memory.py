"""Per-GPU peak memory estimate of a training run, from the run config alone (no model built).

Printed by ``--dry-run`` and in the startup banner (report.py), so that a 32K/64K run or a Slurm
job can be planned before it is submitted. It estimates ``torch.cuda.max_memory_allocated`` of
the pipeline stage that needs most, as the sum of

- weights, gradients and optimizer state: bf16 weights (fp32 with --fp32), megatron DDP's fp32
  main-grad buffer, fp32 master weights + Adam moments (or the precision-aware optimizer's
  dtypes), the optimizer state sharded over DP x CP with the distributed optimizer; blocks split
  by TP and PP, embedding on the first stage, output layer on the last. FP8: TE's cached FP8
  weight and its transpose (2 bytes per FP8 GEMM weight), or FP8 weights (--fp8-param-gather);
- Transformer Engine's cached dummy weight gradients (one bf16 tensor per distinct linear shape,
  returned when it accumulates into main_grad);
- activations (training/activations.py) times the micro-batches in flight on the stage (1F1B:
  PP - rank on rank ``rank``), and the larger of two moments: the output layer's backward (all
  activations, the logits, the LM head's bf16 weight gradient) or a sub-layer's backward (the
  recomputed activations of its recompute group and its gradient buffers).

Not counted: the CUDA context and library handles (outside torch's allocator), allocator
fragmentation, NCCL buffers, the data loader. The fit check therefore asks for 10% headroom.
Calibrated against H100 runs: docs/training.md, "Memory estimate"; tests/training/
test_memory_estimate.py.
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, field

from megatron_hybrid.models.olmo_hybrid.config import ATTENTION_BLOCK, GDN_BLOCK
from megatron_hybrid.training.activations import (
    backward_transient,
    head_items,
    resolve,
    shape_of,
    sublayer_items,
)
from megatron_hybrid.training.config import fp8_bf16_blocks

GIB = 2**30
FIT_FRACTION = 0.9
"""A run fits if its estimate is at most this share of the card: the rest is for the CUDA
context, allocator fragmentation and the estimate's own error (selective recompute at 32K on the
7B proxy estimated at 93-95% of an 80 GB H100 and ran out of memory)."""
LOSS_BYTES_PER_TOKEN = 17  # our loss kernel's fp32 lse, int64 target, bool mask; the fp32 loss mask
# the fused head (layers/output_loss.py): fp32 ce and z, int64 local targets, bool range mask,
# fp32 ce and z weights, per token
FUSED_LOSS_BYTES_PER_TOKEN = 25
DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "fp8": 1}


@dataclass
class StageMemory:
    """Bytes one rank of a pipeline stage holds at its peak (``total``) and what they are."""

    stage: int
    blocks: list[int]
    in_flight: float
    weights: float = 0.0
    grads: float = 0.0
    optimizer: float = 0.0
    overhead: float = 0.0  # TE's cached dummy weight gradients
    activations: float = 0.0  # kept by autograd at the peak, recomputed ones included
    logits: float = 0.0
    temporaries: float = 0.0  # gradient / weight-gradient buffers of the op at the peak
    peak_at: str = ""
    items: dict = field(default_factory=dict)  # activation item -> bytes at the peak
    kept: float = 0.0  # activations one micro-batch keeps after its forward (logits apart)
    kept_logits: float = 0.0  # its logits and per-token loss statistics

    @property
    def total(self) -> float:
        return (
            self.weights + self.grads + self.optimizer + self.overhead + self.activations
            + self.logits + self.temporaries
        )  # fmt: skip


def stage_segments(run) -> list[list[list[int]]]:
    """Per pipeline rank, the global block indices of each of its (virtual) stages: virtual
    stage j of the pattern belongs to rank j % PP."""
    pp, n = run.parallel.pipeline, run.model.num_layers
    out, start = [[] for _ in range(pp)], 0
    for j, count in enumerate(run.blocks_per_segment()):
        out[j % pp].append(list(range(start, min(start + count, n))))
        start += count
    return out


def in_flight(run, rank: int, microbatches: int) -> float:
    """Micro-batches whose activations rank ``rank`` holds at once: 1F1B runs PP - rank forwards
    before its first backward; the interleaved schedule 2 (PP - rank - 1) + (VP - 1) PP + 1
    virtual-stage forwards, i.e. that over VP stage micro-batches (megatron's warm-up counts)."""
    pp, vp = run.parallel.pipeline, run.parallel.virtual_pipeline or 1
    if vp == 1:
        return min(pp - rank, microbatches)
    return min(2 * (pp - rank - 1) + (vp - 1) * pp + 1, microbatches * vp) / vp


def _static(run, st: StageMemory, dp_cp: int, spec: str) -> None:
    """Weights, gradients, optimizer state and TE's dummy weight gradients of the stage."""
    m, p, t, o = run.model, run.parallel, run.train, run.optim
    tp, counts = p.tensor, m.num_params_by_type()
    per_block = {
        GDN_BLOCK: counts["gdn_mixers"] / max(m.block_types.count(GDN_BLOCK), 1),
        ATTENTION_BLOCK: counts["attention_mixers"] / max(m.block_types.count(ATTENTION_BLOCK), 1),
    }
    mlp = counts["mlps"] / m.num_layers
    params = sum((per_block[m.block_types[i]] + mlp) / tp + 2 * m.hidden_size for i in st.blocks)
    if st.stage == 0:
        params += counts["embedding"] / tp
    if st.stage == p.pipeline - 1:
        params += counts["output_layer"] / tp + m.hidden_size
    gemms, bf16 = m.gemms(tp), fp8_bf16_blocks(run)
    fp8 = sum(
        g.weights
        for i in st.blocks
        if t.fp8_format and i not in bf16
        for g in gemms[m.block_types[i]] + gemms["mlp"]
        if g.fp8
    )
    wbytes = 4 if t.precision == "fp32" else 2
    # FP8: TE caches each FP8 GEMM weight in FP8 with its transpose (Hopper's FP8 GEMMs take
    # one layout only); --fp8-param-gather stores the weight in FP8 (+ the transpose) instead
    st.weights = wbytes * params + (2 - wbytes if t.fp8_param_gather else 2) * fp8
    st.grads = 4 * params  # megatron DDP's main-grad buffer (grad_reduce_in_fp32)
    if t.precision == "fp32":
        master = 0  # the fp32 weights are their own master copy
    elif o.precision_aware_optimizer:
        master = 2  # fp32 = bf16 weight + 16-bit remainder (TE FusedAdam), or an fp16 copy
    else:
        master = 4
    moments = DTYPE_BYTES[o.exp_avg_dtype] + DTYPE_BYTES[o.exp_avg_sq_dtype]
    if not o.precision_aware_optimizer:
        moments = 8
    st.optimizer = params * (master + moments) / (dp_cp if p.distributed_optimizer else 1)
    if spec == "te" and t.gradient_accumulation_fusion:
        kinds = {m.block_types[i] for i in st.blocks}
        shapes = {(g.rows, g.cols) for k in kinds for g in gemms[k] + gemms["mlp"]}
        st.overhead = wbytes * sum(r * c for r, c in shapes)


def _sublayers(run, blocks: list[int]) -> list[tuple[str, int]]:
    kinds = []
    for i in blocks:
        attn = run.model.block_types[i] == ATTENTION_BLOCK
        kinds += [("attention" if attn else "gdn", i), ("mlp_post" if attn else "mlp_pre", i)]
    return kinds


def _groups(run, n_sublayers: int) -> list[tuple[int, int, bool]]:
    """(first, end, checkpointed) runs of one virtual stage's sub-layers under full recompute
    (megatron's uniform chunks of 2N sub-layers, or the first 2N sub-layers one by one)."""
    r = run.recompute
    if r.granularity != "full":
        return [(i, i + 1, False) for i in range(n_sublayers)]
    size = 2 * r.num_layers
    if r.method == "uniform":
        return [(i, min(i + size, n_sublayers), True) for i in range(0, n_sublayers, size)]
    return [(i, i + 1, i < size) for i in range(n_sublayers)]


def _activations(run, st: StageMemory, segments, shape, tokens: int, last: bool) -> None:
    """The stage's activation peak: the output layer's backward (last stage: everything kept,
    the logits, the LM head's weight gradient) or the backward of one sub-layer (what is kept
    up to it, its recompute group's activations rebuilt, its gradient buffers)."""
    t, modules = run.train, run.recompute.selective_modules()
    bf16, res = fp8_bf16_blocks(run), shape.a * shape.D / shape.sp
    # the embedding keeps the int64 token ids (and a bool vocabulary-range mask under TP)
    kept = Counter(
        {"embedding.token_ids": 8.0 + (run.parallel.tensor > 1)} if st.stage == 0 else {}
    )
    best = (-1.0, 0.0, "", Counter())  # (alive, transient, where, items), one micro-batch, /token
    for seg in segments:
        subs = _sublayers(run, seg)
        for first, end, ckpt in _groups(run, len(subs)):
            rebuilt = Counter()  # a full-recompute group's activations, rebuilt in its backward
            for kind, blk in subs[first:end]:
                items = sublayer_items(kind, shape)
                fp8 = bool(t.fp8_format) and blk not in bf16
                full = Counter()
                for it in resolve(items, frozenset(), fp8):
                    full[it.name] += it.bytes
                rebuilt += full
                alive = kept + (rebuilt if ckpt else full)
                trans = backward_transient("mlp" if kind.startswith("mlp") else kind, shape)
                if alive.total() + trans > best[0] + best[1]:
                    best = (alive.total(), trans, f"the backward of block {blk} ({kind})", alive)
                if not ckpt:
                    for it in resolve(items, modules, fp8):
                        kept[it.name] += it.bytes
            if ckpt:
                kept["block_inputs (full recompute)"] += res
    if run.recompute.granularity == "full" and shape.rope:
        kept["rope_freqs (full recompute)"] = 4 * shape.d  # a checkpoint input, shared
    m = st.in_flight
    head = Counter()
    logits = tmp = 0.0
    kept_logits = 0.0
    if last:
        chunk = t.lm_head_loss_chunk_tokens
        for it in head_items(shape, fused=bool(chunk)):
            head[it.name] += it.bytes
        vocab = run.model.vocab_size // run.parallel.tensor
        # the LM head's 16-bit weight gradient (megatron's linear, no wgrad fusion), or the
        # fused head's placeholder of that size for megatron's DDP hook
        wgrad = (4 if t.precision == "fp32" else 2) * vocab * run.model.hidden_size
        if chunk:
            # one chunk of logits at a time; the backward scales the prepared input gradient
            logits = shape.a * vocab * min(chunk, tokens) + FUSED_LOSS_BYTES_PER_TOKEN * tokens
            tmp = wgrad + shape.a * shape.D * tokens
        else:
            logits = (shape.a * vocab + LOSS_BYTES_PER_TOKEN) * tokens  # gradient in place
            kept_logits = logits
            # with micro-batch > 1 the [b, s, V] logits are a copy of the layer's [s, b, V] output
            tmp = max(wgrad + shape.a * shape.D * tokens, logits if t.micro_batch_size > 1 else 0)
    st.kept, st.kept_logits = (kept.total() + head.total()) * tokens, kept_logits
    # the head's items and the logits belong to the one micro-batch at the loss
    at_head = {
        k: v * tokens for k, v in (Counter({k: v * m for k, v in kept.items()}) + head).items()
    }
    alive, trans, where, items = best
    others = (m - 1) * kept.total()  # the other micro-batches in flight
    if sum(at_head.values()) + logits + tmp >= (alive + others + trans) * tokens:
        st.activations, st.logits, st.temporaries = sum(at_head.values()), logits, tmp
        st.peak_at = "the output layer's backward" if last else "the last forward"
        st.items = at_head
    else:
        st.activations, st.temporaries = (alive + others) * tokens, trans * tokens
        st.peak_at = where
        st.items = {k: (v + (m - 1) * kept[k]) * tokens for k, v in items.items()}


def estimate_stages(run, world_size: int, spec: str | None = None, microbatches: int | None = None):
    """A :class:`StageMemory` for every pipeline rank. ``spec``: te | local (default: the run's,
    te for auto: what a GPU run with Transformer Engine builds)."""
    p, t = run.parallel, run.train
    spec = spec or (t.spec if t.spec != "auto" else "te")
    dp = run.data_parallel_size(world_size)
    nmb = microbatches or max(t.global_batch_size // (t.micro_batch_size * dp), 1)
    shape = shape_of(run, spec)
    tokens = t.micro_batch_size * run.data.seq_length // p.context
    out = []
    for rank, segments in enumerate(stage_segments(run)):
        st = StageMemory(rank, [b for seg in segments for b in seg], in_flight(run, rank, nmb))
        _static(run, st, dp * p.context, spec)
        _activations(run, st, segments, shape, tokens, last=rank == p.pipeline - 1)
        out.append(st)
    return out


def estimate(run, world_size: int, spec: str | None = None, microbatches: int | None = None):
    """The pipeline stage with the highest estimated peak (:class:`StageMemory`)."""
    return max(estimate_stages(run, world_size, spec, microbatches), key=lambda s: s.total)


def device_memory_gib() -> float | None:
    """Memory of the visible CUDA device in GiB, None without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GIB


def fits(total_bytes: float, capacity_gib: float) -> bool:
    """Whether an estimate fits a card of ``capacity_gib`` with FIT_FRACTION headroom."""
    return total_bytes <= FIT_FRACTION * capacity_gib * GIB


# Settings tried, cheapest first, when a run does not fit: (flags, changes to the run config).
_PRECISION_AWARE = (
    "--use-distributed-optimizer --use-precision-aware-optimizer --exp-avg-dtype bf16 "
    "--exp-avg-sq-dtype bf16",
    {"parallel.distributed_optimizer": True, "optim.precision_aware_optimizer": True,
     "optim.exp_avg_dtype": "bf16", "optim.exp_avg_sq_dtype": "bf16"},
)  # fmt: skip
_RECOMPUTE = [
    (f"--recompute-granularity selective --recompute-modules {' '.join(mods)}",
     {"recompute.granularity": "selective", "recompute.modules": list(mods),
      "recompute.method": None, "recompute.num_layers": None})
    for mods in (("layernorm", "mlp"), ("gdn", "layernorm", "mlp"))
] + [
    ("--recompute-granularity full --recompute-method uniform --recompute-num-layers 1",
     {"recompute.granularity": "full", "recompute.method": "uniform", "recompute.num_layers": 1,
      "recompute.modules": None}),
]  # fmt: skip


def _variant(run, changes: dict):
    new = copy.deepcopy(run)
    for dotted, value in changes.items():
        section, name = dotted.split(".")
        setattr(getattr(new, section), name, value)
    return new


def suggestions(run, world_size: int, capacity_gib: float, spec=None, microbatches=None):
    """Up to two settings that make the run fit, cheapest first, as (flags, estimate bytes):
    the lean optimizer state alone, then each recompute setting with the run's own optimizer
    state and with the lean one."""
    o, out = run.optim, []
    opt = [("", {})]
    if not (o.precision_aware_optimizer and o.exp_avg_dtype != "fp32"):
        opt.append(_PRECISION_AWARE)
    tries = [_PRECISION_AWARE] if len(opt) > 1 else []
    tries += [(f"{rf} {of}".strip(), {**rc, **oc}) for rf, rc in _RECOMPUTE for of, oc in opt]
    for flags, changes in tries:
        if run.train.fp8_format and "mlp" in changes.get("recompute.modules", []):
            continue  # refused with FP8 (training/config.py)
        total = estimate(_variant(run, changes), world_size, spec, microbatches).total
        if fits(total, capacity_gib) and all(f != flags for f, _ in out):
            out.append((flags, total))
        if len(out) == 2:
            break
    return out
