"""Our trainer's dist checkpoints seen from the model side (for HF conversion and generation).

A checkpoint's ``run_config.json`` gives the model config; the weights load into a TP=1/PP=1
model in one process (megatron's dist checkpointing reshards whatever TP/PP/VP layout saved
them), or into a generation session (``load_session``, tools/generate.py). The file format
itself is training/checkpoint.py's. The lowest layer of the conversion modules:
``ConversionError`` and the dtype names live here.
"""

from __future__ import annotations

import json
import os

import torch

from megatron_hybrid.models.olmo_hybrid.config import OlmoHybridConfig

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float32: "float32", torch.float16: "float16"}


class ConversionError(ValueError):
    """A conversion that cannot proceed; the message names the file, key or value."""


def model_config_from_run_dict(run_dict: dict, where: str = "run_config.json") -> OlmoHybridConfig:
    """The model section of a saved ``run_config.json`` as an OlmoHybridConfig."""
    if not isinstance(run_dict.get("model"), dict):
        raise ConversionError(f"{where}: no 'model' section")
    m = dict(run_dict["model"])
    for k in ("gdn_a_log_range", "gdn_dt_range"):
        if isinstance(m.get(k), list):
            m[k] = tuple(m[k])
    try:
        return OlmoHybridConfig(**m)
    except TypeError as e:
        raise ConversionError(f"{where}: model section does not fit this version: {e}") from None


def resolve_checkpoint(
    load: str, iteration: int | None = None, verify: bool = True
) -> tuple[str, int | None]:
    """``(iter_N directory, N)`` for ``--load`` (a save root with its tracker, or an ``iter_N``
    directory itself) and an optional ``--iteration``; with ``verify``, every file of it checked
    against the checksums recorded at save time (corrupt weights are an error naming the file)."""
    from megatron_hybrid.training import checkpoint as ckpt

    path, iteration = _find_checkpoint(load, iteration)
    if verify:
        try:
            ckpt.verify_checksums(path)
        except ckpt.CheckpointError as e:
            raise ConversionError(str(e)) from None
    return path, iteration


def _find_checkpoint(load: str, iteration: int | None) -> tuple[str, int | None]:
    from megatron_hybrid.training import checkpoint as ckpt

    if not os.path.isdir(load):
        raise ConversionError(f"--load {load}: no such directory")
    if iteration is None and os.path.isfile(os.path.join(load, "metadata.json")):
        return load, None
    if iteration is None:
        try:
            iteration = ckpt.latest_iteration(load)
        except ckpt.CheckpointError as e:
            raise ConversionError(str(e)) from None
        if iteration is None:
            raise ConversionError(
                f"--load {load}: no {ckpt.TRACKER} (and not an iter_N directory); "
                "give --iteration N or the iteration directory"
            )
    path = ckpt.iteration_dir(load, iteration)
    if not os.path.isdir(path):
        raise ConversionError(f"{path} does not exist")
    return path, iteration


def read_run_config(path: str) -> dict:
    f = os.path.join(path, "run_config.json")
    if not os.path.isfile(f):
        raise ConversionError(f"{f} not found (not a checkpoint saved by megatron-hybrid-train?)")
    with open(f) as fh:
        return json.load(fh)


def checkpoint_weight_dtype(path: str) -> torch.dtype:
    """dtype the checkpoint stores the model weights in (bf16 for a bf16 run, else fp32)."""
    from megatron_hybrid import mcore
    from megatron_hybrid.training import checkpoint as ckpt

    try:
        with ckpt.reading(path):
            meta = mcore.dist_checkpointing.load_tensors_metadata(path)
    except ckpt.CheckpointError as e:
        raise ConversionError(str(e)) from None
    emb = meta.get("embedding.word_embeddings.weight")
    if emb is None:
        raise ConversionError(f"{path}: no tensor 'embedding.word_embeddings.weight' in checkpoint")
    return emb.dtype


def single_rank_model(cfg: OlmoHybridConfig, dtype: torch.dtype = torch.float32):
    """A TP=1/PP=1 model with unset weights (megatron's parallel state must be initialised)."""
    from megatron_hybrid.models.olmo_hybrid.model import build_model

    model = build_model(
        cfg,
        cfg.transformer_config(params_dtype=torch.float32),
        flavour="local",
        parallel_output=False,
        seed=None,
    )
    return model.to(dtype)


def load_checkpoint_model(path: str, cfg: OlmoHybridConfig, dtype: torch.dtype = torch.float32):
    """Our model with the weights of checkpoint ``path`` (any layout) in ``dtype``, one process
    (dist checkpointing casts the stored weights to it)."""
    from megatron_hybrid.training import checkpoint as ckpt

    model = single_rank_model(cfg, dtype)
    try:
        ckpt.load_model_only(path, [model])
    except ckpt.CheckpointError as e:
        raise ConversionError(str(e)) from None
    return model.eval()


def unsharded_state_dict(model) -> dict[str, torch.Tensor]:
    """The TP=1 model's parameters by name, on CPU (extra states dropped)."""
    return {
        k: v.detach().cpu()
        for k, v in model.state_dict().items()
        if not k.endswith("_extra_state") and isinstance(v, torch.Tensor)
    }


# ---------------------------------------------------------------------------------------------
# generation (tools/generate.py): a checkpoint + its tokenizer as an inference session


def _tokenizer_from(run: dict, tok_type: str | None, tok_model: str | None):
    from megatron_hybrid.data.tokenizers import build_tokenizer
    from megatron_hybrid.inference.session import GenerateError

    data = run.get("data") or {}
    tok_model = tok_model or data.get("tokenizer_model")
    if not tok_model:
        return None
    if tok_type is None:
        tok_type = data.get("tokenizer_type") if tok_model == data.get("tokenizer_model") else None
    if tok_type is None:
        tok_type = (
            "SentencePieceTokenizer" if tok_model.endswith(".model") else "HuggingFaceTokenizer"
        )
    try:
        return build_tokenizer(tok_type, tok_model)
    except (OSError, RuntimeError, ValueError) as e:
        raise GenerateError(f"tokenizer {tok_model!r} ({tok_type}) cannot be loaded: {e}") from None


def load_session(load, iteration=None, dtype="auto", tok_type=None, tok_model=None, verify=True):
    """A ``GenerationSession`` on checkpoint ``--load`` (``--iteration``; dtype auto: as stored
    on GPU, fp32 on CPU) with its tokenizer (the run's, or ``tok_model``); bad input raises
    ``GenerateError`` naming the file or value."""
    from megatron_hybrid import mcore
    from megatron_hybrid.inference.session import GenerateError, GenerationSession
    from megatron_hybrid.parallel import state

    try:
        path, _ = resolve_checkpoint(load, iteration, verify)
        run = read_run_config(path)
        cfg = model_config_from_run_dict(run, os.path.join(path, "run_config.json"))
    except ConversionError as e:
        raise GenerateError(str(e)) from None
    tokenizer = _tokenizer_from(run, tok_type, tok_model)
    if not mcore.parallel_state.model_parallel_is_initialized():
        state.initialize(state.ParallelLayout())
    cuda = torch.cuda.is_available()
    if dtype == "auto":
        torch_dtype = checkpoint_weight_dtype(path) if cuda else torch.float32
    else:
        torch_dtype = DTYPES[dtype]
    # decoding has no backward: the auto kernels (ours on GPU, torch on CPU) are exact
    cfg = cfg.replace(gdn_backend="auto")
    try:
        model = load_checkpoint_model(path, cfg, torch_dtype)
    except ConversionError as e:
        raise GenerateError(str(e)) from None
    where = f"{path} ({'cuda' if cuda else 'cpu'}, {str(torch_dtype).replace('torch.', '')})"
    seq_length = (run.get("data") or {}).get("seq_length")
    return GenerationSession(model, cfg, tokenizer, where, seq_length)
