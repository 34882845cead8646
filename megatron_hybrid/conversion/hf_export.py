"""Our checkpoint -> HF ``olmo_hybrid`` directory (``export_to_hf``, tools/convert_to_hf.py),
then the export validated against transformers: logits and greedy generation.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass

import torch

from megatron_hybrid.conversion.hf_files import (
    DEFAULT_MAX_SHARD_BYTES,
    export_config_dict,
    write_safetensors,
)
from megatron_hybrid.conversion.hf_tokenizer import TokenizerExport, export_tokenizer
from megatron_hybrid.conversion.saved_checkpoints import (
    DTYPE_NAMES,
    DTYPES,
    ConversionError,
    checkpoint_weight_dtype,
    load_checkpoint_model,
    model_config_from_run_dict,
    read_run_config,
    resolve_checkpoint,
    unsharded_state_dict,
)
from megatron_hybrid.models.olmo_hybrid.config import OlmoHybridConfig
from megatron_hybrid.models.olmo_hybrid.hf_mapping import megatron_to_hf

# ---------------------------------------------------------------------------------------------
# validation


@dataclass
class GreedyResult:
    prompt_tokens: int
    new_tokens: int
    equal: int
    """Leading generated tokens that are the same."""
    tie_at: int | None = None
    """First differing step when our top two logits there are within ``TIE`` (a near-tie the
    tiny float differences may flip; accepted), else None."""

    @property
    def ok(self) -> bool:
        return self.equal == self.new_tokens or self.tie_at is not None


TIE = 1e-4


def compare_greedy(ours, hf, prompt: torch.Tensor, new_tokens: int = 8) -> GreedyResult:
    """Greedy continuation of ``prompt`` ([1, P]) by transformers' ``generate`` (its cached,
    recurrent decode path) and by ours (inference/decoder.py: recurrent state, one token per
    step). End-of-text is not special on either side."""
    from megatron_hybrid.inference.decoder import HybridDecoder

    vocab = hf.config.vocab_size
    out = hf.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=hf.config.pad_token_id,
        eos_token_id=None,
    )
    theirs = out[0, prompt.shape[1] :].tolist()
    device = next(ours.parameters()).device
    decoder = HybridDecoder(ours)
    state = decoder.new_state()
    logits = decoder.forward(prompt.to(device), state)[0, -1, :vocab].cpu()
    equal = 0
    for step in range(len(theirs)):
        mine = int(logits.argmax())
        if mine != theirs[step]:
            margin = (logits[mine] - logits[theirs[step]]).item()
            tie = step if margin <= TIE * max(1.0, logits.abs().max().item()) else None
            return GreedyResult(prompt.shape[1], new_tokens, equal, tie)
        equal += 1
        if step + 1 < len(theirs):
            nxt = torch.tensor([[mine]], device=device)
            logits = decoder.forward(nxt, state)[0, -1, :vocab].cpu()
    return GreedyResult(prompt.shape[1], new_tokens, equal)


def validate_export(
    hf_dir: str, ours, batch: int = 2, seq_len: int = 64, seed: int = 0, new_tokens: int = 8
):
    """Load ``hf_dir`` with ``AutoModelForCausalLM`` (CPU, fp32) and compare logits with our model
    (fp32 ``assert_close`` 1e-4) on hf_compare's fixed random batch, then a greedy continuation
    of its first 16 tokens. Returns (ParityResult, GreedyResult)."""
    from transformers import AutoModelForCausalLM

    from megatron_hybrid.conversion.hf_compare import compare_logits, random_batch

    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = random_batch(hf.config, batch, seq_len, seed)
    with torch.no_grad():
        res = compare_logits(ours.eval(), hf, ids, "fp32")
        greedy = compare_greedy(ours, hf, ids[:1, :16], new_tokens)
    del hf
    return res, greedy


# ---------------------------------------------------------------------------------------------
# top level


@dataclass
class ExportResult:
    hf_dir: str
    checkpoint: str
    num_tensors: int
    num_files: int
    total_bytes: int
    dtype: str
    hf_vocab_size: int
    tokenizer: TokenizerExport | None = None
    parity: object = None
    greedy: GreedyResult | None = None


def _hf_vocab(arg, cfg: OlmoHybridConfig, tok: TokenizerExport | None) -> int:
    if arg is None:
        return cfg.vocab_size
    if arg == "tokenizer":
        if tok is None or tok.vocab_size is None:
            raise ConversionError("--hf-vocab-size tokenizer needs --tokenizer-model")
        n = tok.vocab_size
    else:
        try:
            n = int(arg)
        except ValueError:
            raise ConversionError(
                f"--hf-vocab-size {arg!r}: give a number or 'tokenizer'"
            ) from None
    if not 0 < n <= cfg.vocab_size:
        raise ConversionError(
            f"--hf-vocab-size {n}: must be in 1..{cfg.vocab_size} (the checkpoint's vocabulary)"
        )
    if tok is not None and tok.vocab_size is not None and n < tok.vocab_size:
        raise ConversionError(
            f"--hf-vocab-size {n} is smaller than the tokenizer's {tok.vocab_size}"
        )
    return n


def export_to_hf(
    load: str,
    save: str,
    *,
    iteration: int | None = None,
    dtype: str = "auto",
    tokenizer_model: str | None = None,
    hf_vocab_size: str | int | None = None,
    validate: bool = True,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: bool = True,
    log=print,
    verify: bool = True,
) -> ExportResult:
    """Our checkpoint -> HF directory (then validated unless ``validate=False``). Initialises a
    one-process megatron parallel state if none exists."""
    path, _ = resolve_checkpoint(load, iteration, verify)
    cfg = model_config_from_run_dict(read_run_config(path), os.path.join(path, "run_config.json"))
    # The recurrence backend does not touch the weights; validation runs on CPU.
    cfg = cfg.replace(gdn_backend="auto")
    if os.path.isdir(save) and os.listdir(save):
        raise ConversionError(f"--save {save} exists and is not empty")
    if dtype != "auto" and dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype!r}: choose auto, bf16 or fp32")
    if hf_vocab_size not in (None, "tokenizer") and not str(hf_vocab_size).isdigit():
        raise ConversionError(f"--hf-vocab-size {hf_vocab_size!r}: give a number or 'tokenizer'")
    created = not os.path.exists(save)
    os.makedirs(save, exist_ok=True)
    try:
        return _export(
            path,
            cfg,
            save,
            dtype,
            tokenizer_model,
            hf_vocab_size,
            validate,
            max_shard_bytes,
            progress,
            log,
        )
    except BaseException:
        if created:  # leave no half-written directory behind
            shutil.rmtree(save, ignore_errors=True)
        raise


def _export(
    path, cfg, save, dtype, tokenizer_model, hf_vocab_size, validate, max_shard_bytes, progress, log
) -> ExportResult:
    from megatron_hybrid import mcore
    from megatron_hybrid.parallel import state

    tok = export_tokenizer(tokenizer_model, save) if tokenizer_model else None
    hf_vocab = _hf_vocab(hf_vocab_size, cfg, tok)
    eos, pad = cfg.eos_token_id, cfg.pad_token_id
    if tok is not None:
        if eos is not None and tok.eos is not None and eos != tok.eos:
            log(f"note: model config eos_token_id={eos}, tokenizer's eos is {tok.eos}; using it")
        eos = tok.eos if tok.eos is not None else eos
        pad = tok.pad if tok.pad is not None else pad
    if not mcore.parallel_state.model_parallel_is_initialized():
        state.initialize(state.ParallelLayout())
    stored = checkpoint_weight_dtype(path)
    out_dtype = stored if dtype == "auto" else DTYPES[dtype]
    log(
        f"loading {path} ({cfg.num_layers} layers, vocab {cfg.vocab_size}, weights stored as "
        f"{DTYPE_NAMES.get(stored, stored)}) -> {DTYPE_NAMES[out_dtype]}"
    )
    # The model holds the weights as exported (half the memory for a bf16 export).
    model = load_checkpoint_model(path, cfg, out_dtype)

    hf_sd = megatron_to_hf(unsharded_state_dict(model), cfg, hf_vocab_size=hf_vocab)
    index = write_safetensors(save, hf_sd, max_shard_bytes, progress)
    n_files = len(set(index["weight_map"].values()))
    conf = export_config_dict(cfg, hf_vocab, out_dtype, eos, pad)
    with open(os.path.join(save, "config.json"), "w") as f:
        json.dump(conf, f, indent=2)
        f.write("\n")
    _write_generation_config(save, eos, pad)
    res = ExportResult(
        save,
        path,
        len(hf_sd),
        n_files,
        index["metadata"]["total_size"],
        DTYPE_NAMES[out_dtype],
        hf_vocab,
        tok,
    )
    del hf_sd
    log(
        f"wrote {res.num_tensors} tensors ({res.total_bytes / 1e9:.3f} GB, {res.dtype}) in "
        f"{n_files} file(s) + config.json, generation_config.json to {save}"
    )
    if tok is not None:
        log(f"tokenizer: {tok.note}")
    if validate:
        # fp32 on both sides, with the weights as exported.
        res.parity, res.greedy = validate_export(save, model.float())
    return res


def _write_generation_config(out_dir: str, eos: int | None, pad: int | None) -> None:
    import transformers

    gen = {"_from_model_config": True, "transformers_version": transformers.__version__}
    if eos is not None:
        gen["eos_token_id"] = eos
    if pad is not None:
        gen["pad_token_id"] = pad
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump(gen, f, indent=2)
        f.write("\n")
