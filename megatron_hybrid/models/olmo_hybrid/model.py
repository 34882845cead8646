"""Build an Olmo-Hybrid model on megatron-core's HybridModel for the current parallel layout."""

from __future__ import annotations

import torch

from megatron_hybrid import mcore
from megatron_hybrid.models.olmo_hybrid.config import OlmoHybridConfig
from megatron_hybrid.models.olmo_hybrid.init import initialize_weights
from megatron_hybrid.models.olmo_hybrid.specs import stack_spec
from megatron_hybrid.parallel.state import process_groups


def default_flavour() -> str:
    """'te' where Transformer Engine is importable on a GPU, else 'local'."""
    if not torch.cuda.is_available():
        return "local"
    try:
        mcore.te_modules()
        return "te"
    except (ImportError, RuntimeError):
        return "local"


def build_model(
    cfg: OlmoHybridConfig,
    transformer_config: mcore.TransformerConfig | None = None,
    *,
    flavour: str | None = None,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    vp_stage: int | None = None,
    parallel_output: bool = True,
    pattern: str | None = None,
    seed: int | None = 1234,
    recompute_modules=(),
) -> mcore.HybridModel:
    """One model chunk on this rank (megatron's parallel state must be initialised).

    ``pattern`` may carry '|' pipeline boundaries; by default the blocks are split evenly over
    pipeline x virtual-pipeline segments. ``seed`` draws the Olmo init (layout-invariant, see
    init.py); None leaves the parameters unset (e.g. weights are loaded right after).
    ``recompute_modules``: selective activation recompute (specs.stack_spec); full recompute
    comes with ``transformer_config`` (its recompute_granularity/method/num_layers).
    """
    ps = mcore.parallel_state
    tcfg = transformer_config or cfg.transformer_config(
        tensor_parallel=ps.get_tensor_model_parallel_world_size(),
        pipeline_parallel=ps.get_pipeline_model_parallel_world_size(),
        context_parallel=ps.get_context_parallel_world_size(),
    )
    segments = tcfg.pipeline_model_parallel_size * (tcfg.virtual_pipeline_model_parallel_size or 1)
    if pattern is None:
        pattern = cfg.layer_pattern(segments)
    elif OlmoHybridConfig.block_types_from_pattern(pattern) != cfg.block_types:
        raise ValueError(f"layer pattern {pattern!r} does not match the config's block types")
    if pre_process is None:
        pre_process = ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    model = mcore.HybridModel(
        config=tcfg,
        hybrid_stack_spec=stack_spec(cfg, flavour or default_flavour(), recompute_modules),
        vocab_size=cfg.vocab_size,
        max_sequence_length=cfg.max_position_embeddings,
        hybrid_layer_pattern=pattern,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=parallel_output,
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope" if cfg.rope_theta is not None else "none",
        rotary_base=cfg.rope_theta or 10000,
        pg_collection=process_groups(),
        vp_stage=vp_stage,
    )
    if torch.cuda.is_available():
        model = model.cuda()
    if seed is not None:
        initialize_weights(model, cfg, seed)
    return model
