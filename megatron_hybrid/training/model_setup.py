"""Model chunks, DDP wrapping, optimizer and LR schedule on megatron-core for a RunConfig."""

from __future__ import annotations

import torch

from megatron_hybrid import mcore
from megatron_hybrid.data.batches import samples_after_steps
from megatron_hybrid.models.olmo_hybrid.model import build_model, default_flavour
from megatron_hybrid.training.config import check_schedule, fp8_recipe


def params_dtype(run) -> torch.dtype:
    p = run.train.precision
    if p == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[p]


def transformer_config(run):
    p = run.parallel
    dtype = params_dtype(run)
    return run.model.transformer_config(
        tensor_parallel=p.tensor,
        pipeline_parallel=p.pipeline,
        virtual_pipeline=p.virtual_pipeline,
        context_parallel=p.context,
        sequence_parallel=p.sequence_parallel,
        params_dtype=dtype,
        # Loss is summed per token and divided by the global token count (in the optimizer step),
        # so every parallel layout optimises exactly the same objective.
        calculate_per_token_loss=True,
        deterministic_mode=run.train.deterministic,
        # full recompute (megatron-core's HybridStack path); selective goes to the layers
        **run.recompute.transformer_config_kwargs(),
        **fp8_fields(run),
    )


def fp8_fields(run) -> dict:
    """megatron-core's TransformerConfig FP8 fields for the run (empty without --fp8-format).
    megatron counts *sub-layers* (a block is a mixer and an MLP sub-layer, HybridStack's
    ``layer_number``), our bf16 first/last counts are blocks: hence the factor 2. megatron's
    HybridStack then enters TE's autocast (``fp8_utils.get_fp8_context``) around the whole stack
    for the delayed recipe and around every FP8 sub-layer otherwise; the LM head runs after it,
    in bf16."""
    t = run.train
    recipe = fp8_recipe(run)
    if recipe is None:
        return {}
    return dict(
        fp8=t.fp8_format,
        fp8_recipe=recipe,
        fp8_margin=t.fp8_margin,
        fp8_amax_history_len=t.fp8_amax_history_len,
        fp8_amax_compute_algo=t.fp8_amax_compute_algo,
        fp8_param=t.fp8_param_gather,
        first_last_layers_bf16=t.first_last_layers_bf16,
        num_layers_at_start_in_bf16=2 * t.num_layers_at_start_in_bf16,
        num_layers_at_end_in_bf16=2 * t.num_layers_at_end_in_bf16,
    )


def layer_pattern(run) -> str:
    p = run.parallel
    segments = p.pipeline * (p.virtual_pipeline or 1)
    if run.hybrid_layer_pattern:
        pattern = run.hybrid_layer_pattern
        if "|" in pattern and pattern.count("|") + 1 != segments:
            from megatron_hybrid.models.olmo_hybrid.config import ConfigError

            raise ConfigError(
                f"hybrid layer pattern has {pattern.count('|') + 1} pipeline segments; "
                f"PP({p.pipeline}) x VP({p.virtual_pipeline or 1}) = {segments} are needed"
            )
        if "|" in pattern or segments == 1:
            return pattern
    return run.model.layer_pattern(segments)


def build_model_chunks(run, tcfg):
    """One chunk per virtual-pipeline stage, each wrapped in megatron DDP (+ bf16 wrapper)."""
    flavour = default_flavour() if run.train.spec == "auto" else run.train.spec
    pattern = layer_pattern(run)
    vp = run.parallel.virtual_pipeline
    chunks = []
    for vp_stage in range(vp or 1):
        model = build_model(
            run.model,
            tcfg,
            flavour=flavour,
            pattern=pattern,
            vp_stage=vp_stage if vp else None,
            seed=run.train.seed,
            recompute_modules=run.recompute.selective_modules(),
        )
        if tcfg.bf16:
            model = mcore.Float16Module(tcfg, model)
        ddp_cfg = mcore.DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=run.parallel.distributed_optimizer,
            check_for_nan_in_grad=False,
            fp8_param_gather=bool(run.train.fp8_format and run.train.fp8_param_gather),
        )
        model = mcore.DistributedDataParallel(config=tcfg, ddp_config=ddp_cfg, module=model)
        model.vp_stage = vp_stage if vp else None
        chunks.append(model)
    for m in chunks:
        m.broadcast_params()  # identical replicas across data-parallel ranks
    if flavour == "te" and run.train.gradient_accumulation_fusion and torch.cuda.is_available():
        fuse_wgrad_accumulation(chunks)
    return chunks, flavour


def fuse_wgrad_accumulation(chunks) -> int:
    """Let every Transformer Engine linear accumulate its weight gradient into the parameter's
    fp32 ``main_grad`` (megatron DDP's buffer) inside the wgrad GEMM, instead of writing a bf16
    gradient that DDP's hook then adds. TE reads the flag at each forward; it is set after the
    model is built because megatron's config switch would also require apex for its own
    lm-head linear. Returns how many linears were switched."""
    n = 0
    for chunk in chunks:
        for mod in chunk.modules():
            if hasattr(mod, "fuse_wgrad_accumulation") and hasattr(mod, "weight"):
                mod.fuse_wgrad_accumulation = True
                n += 1
    return n


def _no_decay(run):
    decay_embeddings = run.optim.decay_embeddings

    def fn(param, name: str) -> bool:
        if param.ndim == 1 or name.endswith(".bias"):
            return True  # norms, A_log, dt_bias, out-norm weight
        return "word_embeddings" in name and not decay_embeddings

    return fn


def build_optimizer(run, tcfg, chunks):
    check_schedule(run)  # megatron's scheduler would assert on these
    o = run.optim
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if o.precision_aware_optimizer:
        if not torch.cuda.is_available():
            from megatron_hybrid.errors import ConfigError

            raise ConfigError(
                "--use-precision-aware-optimizer needs Transformer Engine's FusedAdam on a GPU"
            )
        dtypes["fp8"] = torch.uint8  # megatron/TE spell an fp8 optimizer state as uint8
    ocfg = mcore.OptimizerConfig(
        optimizer="adam",
        use_precision_aware_optimizer=o.precision_aware_optimizer,
        main_params_dtype=dtypes[o.main_params_dtype],
        exp_avg_dtype=dtypes[o.exp_avg_dtype],
        exp_avg_sq_dtype=dtypes[o.exp_avg_sq_dtype],
        lr=o.lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        clip_grad=o.clip_grad,
        bf16=tcfg.bf16,
        params_dtype=tcfg.params_dtype,
        use_distributed_optimizer=run.parallel.distributed_optimizer,
    )
    key = mcore.ParamKey(
        with_name_predicate=mcore.ParamWithNamePredicate(name="olmo_no_decay", fn=_no_decay(run))
    )
    overrides = {key: mcore.ParamGroupOverride(wd_mult=0.0)}
    if ocfg.use_distributed_optimizer:
        mcore.fix_torch_adam_distributed_optimizer()  # upstream bugs without apex/TE
    optimizer = mcore.get_megatron_optimizer(ocfg, chunks, config_overrides=overrides)
    t = run.train
    decay_iters = o.decay_iters or t.train_iters
    style = {"wsd": "WSD"}.get(o.decay_style.lower(), o.decay_style.lower())
    wsd_iters = o.wsd_decay_iters or max(1, decay_iters // 10)

    # megatron's scheduler counts samples (it is stepped by the step's global batch size): its
    # boundaries are the samples consumed by those iterations, so with --rampup-batch-size
    # warmup and decay still end at the iterations the flags name.
    def samples(iters: int) -> int:
        return samples_after_steps(iters, t.global_batch_size, t.rampup_batch_size)

    scheduler = mcore.OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=samples(o.warmup_iters),
        lr_decay_steps=samples(decay_iters),
        lr_decay_style=style,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=samples(decay_iters),
        wd_incr_style="constant",
        wsd_decay_steps=samples(decay_iters) - samples(decay_iters - wsd_iters)
        if style == "WSD"
        else None,
        lr_wsd_decay_style="linear" if style == "WSD" else None,
    )
    return optimizer, scheduler
