"""HF ``olmo_hybrid`` directory -> weights-only checkpoint of our trainer (``import_from_hf``,
tools/convert_from_hf.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from megatron_hybrid.conversion.hf_files import (
    normalize_hf_names,
    read_hf_config,
    read_hf_tensors,
)
from megatron_hybrid.conversion.saved_checkpoints import ConversionError, single_rank_model
from megatron_hybrid.models.olmo_hybrid.config import OlmoHybridConfig
from megatron_hybrid.models.olmo_hybrid.hf_mapping import config_from_hf, hf_to_megatron


@dataclass
class ImportResult:
    checkpoint: str
    num_tensors: int
    vocab_size: int
    hf_vocab_size: int
    config: OlmoHybridConfig


def import_run_dict(cfg: OlmoHybridConfig, hf_dir: str) -> dict:
    """``run_config.json`` of an imported checkpoint: usable as ``megatron-hybrid-train --config``
    (the model section fixes every architecture field; data.vocab_size keeps the rows)."""
    return {
        "preset": "olmo_hybrid_7b",
        "model": cfg.to_dict(),
        "data": {"vocab_size": cfg.vocab_size},
    }


def import_from_hf(
    hf_dir: str,
    save: str,
    *,
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    log=print,
) -> ImportResult:
    """HF directory -> weights-only checkpoint ``<save>/iter_0000000``. TP/PP only check that the
    model splits at that layout (the checkpoint reshards on load at any layout); the vocabulary
    is zero-padded to a multiple of TP if needed."""
    from megatron_hybrid import mcore
    from megatron_hybrid.parallel import state
    from megatron_hybrid.training import checkpoint as ckpt

    if not os.path.isdir(hf_dir):
        raise ConversionError(f"--hf-model {hf_dir}: no such directory")
    hf_cfg = read_hf_config(hf_dir)
    for name, v in (("tensor", tensor_parallel), ("pipeline", pipeline_parallel)):
        if v < 1:
            raise ConversionError(f"--{name}-model-parallel-size {v}: must be >= 1")
    cfg = config_from_hf(hf_cfg, vocab_multiple=tensor_parallel)
    cfg.check_parallel(tensor_parallel)
    cfg.layer_pattern(pipeline_parallel)  # raises if the blocks do not split evenly
    if os.path.exists(os.path.join(save, ckpt.TRACKER)):
        raise ConversionError(f"--save {save} already holds a checkpoint")

    log(f"reading {hf_dir} ({cfg.num_layers} layers, vocab {hf_cfg.get('vocab_size')})")
    hf_sd = normalize_hf_names(read_hf_tensors(hf_dir), cfg)
    n = len(hf_sd)
    emb = hf_sd.get("model.embed_tokens.weight")
    if emb is not None and emb.shape[0] != hf_cfg.get("vocab_size"):
        raise ConversionError(
            f"HF tensor 'model.embed_tokens.weight' has {emb.shape[0]} rows but config.json "
            f"says vocab_size={hf_cfg.get('vocab_size')}"
        )
    full = hf_to_megatron(hf_sd, cfg)
    del hf_sd
    if not mcore.parallel_state.model_parallel_is_initialized():
        state.initialize(state.ParallelLayout())
    # Stored as the HF weights are: bf16 for the release (exact); fp32 if any tensor is wider.
    dtypes = {t.dtype for t in full.values()}
    model = single_rank_model(cfg, dtypes.pop() if len(dtypes) == 1 else torch.float32)
    missing, unexpected = model.load_state_dict(full, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise ConversionError(
            f"model/state mismatch: missing {missing[:3]} unexpected {unexpected[:3]}"
        )
    del full
    path = ckpt.save_weights_only(
        save,
        0,
        [model],
        import_run_dict(cfg, hf_dir),
        {"source": os.path.abspath(hf_dir), "hf_vocab_size": hf_cfg.get("vocab_size")},
    )
    log(f"saved {n} HF tensors as a weights-only checkpoint {path}")
    return ImportResult(path, n, cfg.vocab_size, hf_cfg.get("vocab_size"), cfg)
