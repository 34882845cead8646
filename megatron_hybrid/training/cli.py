"""Command line -> RunConfig: preset, YAML, Megatron flag spellings, key=value overrides.

    megatron-hybrid-train --preset tiny --mock-data --train-iters 20 \\
        --tensor-model-parallel-size 2 optim.lr=1e-3 --train.log_interval=5

Order of precedence (later wins): preset < --config YAML < Megatron flags < overrides.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing

import yaml

from megatron_hybrid.models.olmo_hybrid.config import ConfigError, OlmoHybridConfig
from megatron_hybrid.models.olmo_hybrid.presets import PRESETS, get_preset
from megatron_hybrid.training.config import RunConfig

# Megatron-LM flag -> (dotted field, parser). Accepted verbatim from users' sbatch scripts.
MEGATRON_FLAGS: dict[str, tuple[str, object]] = {
    "--tensor-model-parallel-size": ("parallel.tensor", int),
    "--pipeline-model-parallel-size": ("parallel.pipeline", int),
    "--virtual-pipeline-model-parallel-size": ("parallel.virtual_pipeline", int),
    "--context-parallel-size": ("parallel.context", int),
    "--sequence-parallel": ("parallel.sequence_parallel", True),
    "--use-distributed-optimizer": ("parallel.distributed_optimizer", True),
    "--micro-batch-size": ("train.micro_batch_size", int),
    "--global-batch-size": ("train.global_batch_size", int),
    "--rampup-batch-size": ("train.rampup_batch_size", "int3"),
    "--seq-length": ("data.seq_length", int),
    "--max-position-embeddings": ("model.max_position_embeddings", int),
    "--train-iters": ("train.train_iters", int),
    "--exit-interval": ("train.exit_interval", int),
    "--lr": ("optim.lr", float),
    "--min-lr": ("optim.min_lr", float),
    "--lr-warmup-iters": ("optim.warmup_iters", int),
    "--lr-decay-iters": ("optim.decay_iters", int),
    "--lr-wsd-decay-iters": ("optim.wsd_decay_iters", int),
    "--lr-decay-style": ("optim.decay_style", str),
    "--weight-decay": ("optim.weight_decay", float),
    "--adam-beta1": ("optim.adam_beta1", float),
    "--adam-beta2": ("optim.adam_beta2", float),
    "--adam-eps": ("optim.adam_eps", float),
    "--clip-grad": ("optim.clip_grad", float),
    "--z-loss": ("optim.z_loss", float),
    "--use-precision-aware-optimizer": ("optim.precision_aware_optimizer", True),
    "--main-params-dtype": ("optim.main_params_dtype", str),
    "--exp-avg-dtype": ("optim.exp_avg_dtype", str),
    "--exp-avg-sq-dtype": ("optim.exp_avg_sq_dtype", str),
    "--no-gradient-accumulation-fusion": ("train.gradient_accumulation_fusion", False),
    "--bf16": ("train.precision", "bf16"),
    "--fp32": ("train.precision", "fp32"),
    "--fp8-format": ("train.fp8_format", str),
    "--fp8-recipe": ("train.fp8_recipe", str),
    "--fp8-margin": ("train.fp8_margin", int),
    "--fp8-amax-history-len": ("train.fp8_amax_history_len", int),
    "--fp8-amax-compute-algo": ("train.fp8_amax_compute_algo", str),
    "--first-last-layers-bf16": ("train.first_last_layers_bf16", True),
    "--num-layers-at-start-in-bf16": ("train.num_layers_at_start_in_bf16", int),
    "--num-layers-at-end-in-bf16": ("train.num_layers_at_end_in_bf16", int),
    "--fp8-param-gather": ("train.fp8_param_gather", True),
    "--data-path": ("data.data_path", "list"),
    "--split": ("data.split", str),
    "--mock-data": ("data.mock", True),
    "--tokenizer-type": ("data.tokenizer_type", str),
    "--tokenizer-model": ("data.tokenizer_model", str),
    "--vocab-size": ("data.vocab_size", int),
    "--make-vocab-size-divisible-by": ("data.make_vocab_size_divisible_by", int),
    "--no-document-masking": ("data.document_masking", False),
    "--data-cache-path": ("data.cache_dir", str),
    "--save": ("train.save", str),
    "--load": ("train.load", str),
    "--no-load-optim": ("train.no_load_optim", True),
    "--finetune": ("train.finetune", True),
    "--save-interval": ("train.save_interval", int),
    "--keep-last-checkpoints": ("train.keep_last_checkpoints", int),
    "--ckpt-format": ("train.ckpt_format", str),
    "--no-verify-checkpoint-checksums": ("train.verify_checkpoint_checksums", False),
    "--log-interval": ("train.log_interval", int),
    "--eval-interval": ("train.eval_interval", int),
    "--eval-iters": ("train.eval_iters", int),
    "--tensorboard-dir": ("train.tensorboard_dir", str),
    "--wandb-project": ("train.wandb_project", str),
    "--seed": ("train.seed", int),
    "--deterministic": ("train.deterministic", True),
    "--spec": ("train.spec", str),
    "--hybrid-layer-pattern": ("hybrid_layer_pattern", str),
    # our additions
    "--no-gdn-neg-eigval": ("model.gdn_allow_neg_eigval", False),
    "--synthetic-task": ("synthetic.task", str),
    "--synthetic-train-length": ("synthetic.train_length", int),
    "--synthetic-train-min-length": ("synthetic.train_min_length", int),
    "--synthetic-eval-lengths": ("synthetic.eval_lengths", "ints"),
    "--synthetic-eval-examples": ("synthetic.eval_examples", int),
    "--recompute-granularity": ("recompute.granularity", str),
    "--recompute-method": ("recompute.method", str),
    "--recompute-num-layers": ("recompute.num_layers", int),
    "--recompute-modules": ("recompute.modules", "list"),
    "--gpu-memory-gib": ("train.gpu_memory_gib", float),
    "--lm-head-loss-chunk-tokens": ("train.lm_head_loss_chunk_tokens", int),
}


def _parse_value(text: str, annotation: str):
    """Convert an override string by the field's annotation (dataclass types are strings here)."""
    ann = annotation.replace(" ", "")
    if text.lower() in ("none", "null") and "None" in ann:
        return None
    if ann.startswith("bool"):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean, got {text!r}")
    if ann.startswith("list") or ann.startswith("tuple"):
        items = [x for x in text.replace(",", " ").split() if x]
        if "float" in ann:
            return tuple(float(x) for x in items)
        if "int" in ann:
            return [int(x) for x in items]
        return items
    if ann.startswith("int"):
        return int(text)
    if ann.startswith("float"):
        return float(text)
    return text


def _field_annotation(obj, name: str) -> str:
    for f in dataclasses.fields(obj):
        if f.name == name:
            return f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    raise ConfigError(
        f"unknown config field {name!r} in {type(obj).__name__}; valid: "
        f"{', '.join(f.name for f in dataclasses.fields(obj))}"
    )


def apply_setting(run: RunConfig, dotted: str, value, model_changes: dict) -> None:
    """Set ``section.field`` (strings are converted by the field's type)."""
    parts = dotted.split(".")
    if parts[0] == "model":
        if len(parts) != 2:
            raise ConfigError(f"bad override key {dotted!r}")
        ann = _field_annotation(run.model, parts[1])
        model_changes[parts[1]] = _parse_value(value, ann) if isinstance(value, str) else value
        return
    obj = run
    for p in parts[:-1]:
        if not hasattr(obj, p) or not dataclasses.is_dataclass(getattr(obj, p)):
            raise ConfigError(f"unknown config section {p!r} in {dotted!r}")
        obj = getattr(obj, p)
    ann = _field_annotation(obj, parts[-1])
    if isinstance(value, str):
        try:
            value = _parse_value(value, ann)
        except ValueError as e:
            raise ConfigError(f"{dotted}: {e}") from None
    setattr(obj, parts[-1], value)


def _apply_yaml(run: RunConfig, data: dict, model_changes: dict) -> None:
    for section, body in data.items():
        if section == "preset":
            continue
        if isinstance(body, dict):
            for k, v in body.items():
                if isinstance(v, list) and section == "model" and k.endswith("_range"):
                    v = tuple(v)
                apply_setting(
                    run, f"{section}.{k}", v if not isinstance(v, str) else str(v), model_changes
                )
        else:
            apply_setting(run, section, body, model_changes)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="megatron-hybrid-train",
        description="Pretrain an Olmo-Hybrid model on megatron-core (run under torchrun or srun).",
        epilog="Overrides: section.field=value or --section.field=value (sections: model, "
        "parallel, data, optim, train, synthetic, recompute). Example: optim.lr=3e-4 train.log_interval=10",
    )
    p.add_argument("--preset", default=None, help=f"model preset: {', '.join(PRESETS)}")
    p.add_argument("--config", default=None, help="YAML file with the same sections")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print resolved config, parallel layout, parameters, FLOPs and a per-GPU memory "
        "estimate, then exit "
        "without building a model",
    )
    p.add_argument(
        "--world-size",
        type=int,
        default=None,
        help="with --dry-run: the world size to plan for (default: $WORLD_SIZE or 1)",
    )
    for flag, (_dest, kind) in MEGATRON_FLAGS.items():
        if kind is True or kind is False or kind in ("bf16", "fp32"):
            p.add_argument(flag, action="store_true", default=argparse.SUPPRESS)
        elif kind == "list":
            p.add_argument(flag, nargs="+", default=argparse.SUPPRESS)
        elif kind == "ints":
            p.add_argument(flag, nargs="+", type=int, default=argparse.SUPPRESS)
        elif kind == "int3":  # --rampup-batch-size START INCREMENT SAMPLES
            p.add_argument(
                flag,
                nargs=3,
                type=int,
                metavar=("START", "INCREMENT", "SAMPLES"),
                default=argparse.SUPPRESS,
            )
        else:
            p.add_argument(flag, type=kind, default=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="section.field=value overrides")
    return p


def parse(argv=None) -> tuple[RunConfig, argparse.Namespace]:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    overrides = list(args.overrides)
    for u in unknown:
        if "=" in u and "." in u.split("=")[0]:
            overrides.append(u.removeprefix("--"))
        else:
            parser.error(f"unrecognized argument {u!r}")
    yaml_data = {}
    if args.config:
        with open(args.config) as f:
            yaml_data = yaml.safe_load(f) or {}
    preset = args.preset or yaml_data.get("preset") or "tiny"
    run = RunConfig(preset=preset, model=get_preset(preset))
    model_changes: dict = {}
    _apply_yaml(run, yaml_data, model_changes)
    ns = vars(args)
    for flag, (dest, kind) in MEGATRON_FLAGS.items():
        key = flag[2:].replace("-", "_")
        if key not in ns:
            continue
        value = ns[key]
        if kind is True or kind is False:
            value = bool(kind)
        elif kind in ("bf16", "fp32"):
            value = kind
        apply_setting(run, dest, value, model_changes)
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r} must look like section.field=value")
        k, v = ov.split("=", 1)
        apply_setting(run, k, v, model_changes)
    if run.hybrid_layer_pattern:
        types = OlmoHybridConfig.block_types_from_pattern(run.hybrid_layer_pattern)
        model_changes.update(num_layers=len(types), block_types=types)
    if model_changes:
        run.model = run.model.replace(**model_changes)
    return run, args


_ = typing  # annotations are strings (PEP 563); typing kept for readers of _parse_value
