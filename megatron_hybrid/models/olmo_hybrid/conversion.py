"""HF ``olmo_hybrid`` directories <-> our trainer's dist checkpoints (tools/convert_*_hf.py).

Export (``export_to_hf``): read ``run_config.json`` of an ``iter_N`` directory for the model
config, build a TP=1/PP=1 model in one process and load only its weights (megatron's dist
checkpointing reshards whatever TP/PP/VP layout saved them), map the unsharded state dict with
``hf_mapping.megatron_to_hf`` and write ``config.json``, ``generation_config.json``, sharded
``model-0000i-of-0000N.safetensors`` + ``model.safetensors.index.json`` and the tokenizer. Then
(unless skipped) load the directory with ``transformers.AutoModelForCausalLM`` on CPU in fp32
and compare its logits with our model's on a fixed random batch (hf_compare's machinery).

Import (``import_from_hf``): read an HF directory (one or several safetensors files, the
released allenai/Olmo-Hybrid-7B layout or transformers' ``save_pretrained`` names), map it with
``hf_mapping.hf_to_megatron`` into a TP=1 model and save a weights-only checkpoint
(``<save>/iter_0000000/`` + tracker + ``run_config.json``) that ``megatron-hybrid-train --load``
starts from with a fresh optimizer and schedule.

Every tensor is mapped exactly once; missing, unexpected or mis-shaped tensors and an
unsupported config raise ``ConversionError`` (or hf_mapping's ``KeyError``/``ValueError``/
``ConfigError``) naming the key, which the CLIs print as one ``error: ...`` line (exit 2).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field

import torch

from megatron_hybrid.models.olmo_hybrid.config import ConfigError, OlmoHybridConfig
from megatron_hybrid.models.olmo_hybrid.hf_mapping import (
    config_from_hf,
    hf_config_dict,
    hf_to_megatron,
    megatron_to_hf,
    split_fused_conv,
)

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float32: "float32", torch.float16: "float16"}
DEFAULT_MAX_SHARD_BYTES = 5 * 1000**3
INDEX_FILE = "model.safetensors.index.json"

# transformers loads these on-disk names under its in-memory ones (``conversion_mapping.py``:
# WeightRenaming for olmo_hybrid) and ``save_pretrained`` writes them back out, so directories
# saved by transformers carry them; the released checkpoint uses the in-memory names.
LEGACY_HF_NAMES = (
    (".attention_layer_norm.", ".input_layernorm."),
    (".feedforward_layer_norm.", ".post_attention_layernorm."),
)


class ConversionError(ValueError):
    """A conversion that cannot proceed; the message names the file, key or value."""


# ---------------------------------------------------------------------------------------------
# our checkpoints


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


def resolve_checkpoint(load: str, iteration: int | None = None) -> tuple[str, int | None]:
    """``(iter_N directory, N)`` for ``--load`` (a save root with its tracker, or an ``iter_N``
    directory itself) and an optional ``--iteration``."""
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

    meta = mcore.dist_checkpointing.load_tensors_metadata(path)
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
# HF directories


def normalize_hf_names(sd: dict[str, torch.Tensor], cfg: OlmoHybridConfig) -> dict:
    """The released on-disk layout from what transformers may have written:

    - the legacy norm names (``attention_layer_norm``, ``feedforward_layer_norm``) renamed;
    - a fused GDN conv (``linear_attn.conv1d.weight``, the in-memory form) split into q/k/v;
    - q/k/v convs cut into three *equal* parts re-cut at the q/k/v sizes: transformers 5.24's
      ``save_pretrained`` inverts the load-time concatenation by chunking in three, which is
      wrong whenever the value width differs from the key width (the 7B: 2880/2880/5760 is
      written as 3840 x 3). The concatenation of the three files is the right fused weight.
    """
    out = {}
    for name, t in sd.items():
        new = name
        for old, released in LEGACY_HF_NAMES:
            new = new.replace(old, released)
        if new in out:
            raise ConversionError(f"HF tensor {new!r} appears twice (as {name!r} too)")
        out[new] = t
    out = split_fused_conv(out, cfg)
    key_dim = cfg.gdn_num_heads * cfg.gdn_head_k_dim
    value_dim = cfg.gdn_num_heads * cfg.gdn_head_v_dim
    for i in range(cfg.num_layers):
        names = [f"model.layers.{i}.linear_attn.{x}_conv1d.weight" for x in "qkv"]
        if not all(n in out for n in names):
            continue
        parts = [out[n] for n in names]
        rows = [p.shape[0] for p in parts]
        if rows == [key_dim, key_dim, value_dim] or sum(rows) != 2 * key_dim + value_dim:
            continue  # already right, or wrong in a way _Taker reports with the key's name
        if len({p.shape[1:] for p in parts}) != 1:
            continue
        fused = torch.cat(parts, dim=0)
        for n, p in zip(names, fused.split([key_dim, key_dim, value_dim], dim=0)):
            out[n] = p
    return out


def read_hf_config(hf_dir: str) -> dict:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise ConversionError(f"{path} not found (not an HF model directory?)")
    with open(path) as f:
        cfg = json.load(f)
    if cfg.get("model_type") != "olmo_hybrid":
        raise ConversionError(
            f"{path}: model_type={cfg.get('model_type')!r}: only 'olmo_hybrid' is supported"
        )
    return cfg


def safetensors_files(hf_dir: str) -> list[str]:
    """The weight files of an HF directory: those the index names, else ``*.safetensors``."""
    index = os.path.join(hf_dir, INDEX_FILE)
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map", {})
        files = sorted(set(weight_map.values()))
        for name in files:
            if not os.path.isfile(os.path.join(hf_dir, name)):
                raise ConversionError(f"{index} names {name}, which is missing")
        return [os.path.join(hf_dir, n) for n in files]
    files = sorted(f for f in os.listdir(hf_dir) if f.endswith(".safetensors"))
    if not files:
        bins = [f for f in os.listdir(hf_dir) if f.endswith(".bin")]
        hint = " (only .bin files: re-save with safe_serialization)" if bins else ""
        raise ConversionError(f"{hf_dir}: no .safetensors weights{hint}")
    return [os.path.join(hf_dir, f) for f in files]


def read_hf_tensors(hf_dir: str) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    for path in safetensors_files(hf_dir):
        with safe_open(path, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if key in out:
                    raise ConversionError(f"HF tensor {key!r} is in more than one file")
                out[key] = f.get_tensor(key)
    return out


def _owned(t: torch.Tensor) -> torch.Tensor:
    """A tensor that owns its storage (safetensors refuses views sharing memory)."""
    t = t.contiguous()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size() or t.storage_offset():
        t = t.clone()
    return t


def _readable(path: str) -> None:
    """safetensors creates files 0600; give them the usual umask-based mode like other files."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def write_safetensors(
    out_dir: str,
    tensors: dict[str, torch.Tensor],
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: bool = True,
) -> dict:
    """``model-0000i-of-0000N.safetensors`` files of at most ``max_shard_bytes`` each (a larger
    tensor gets a file of its own) and ``model.safetensors.index.json``; returns the index."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    weight_map = {}
    with tqdm(
        total=total, unit="B", unit_scale=True, desc="writing safetensors", disable=not progress
    ) as bar:
        for i, names in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            for name in names:
                weight_map[name] = fname
            part = {name: _owned(tensors[name]) for name in names}
            save_file(part, os.path.join(out_dir, fname), metadata={"format": "pt"})
            _readable(os.path.join(out_dir, fname))
            bar.update(sum(t.numel() * t.element_size() for t in part.values()))
            del part
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
        json.dump(index, f, indent=2)
        f.write("\n")
    return index


def export_config_dict(
    cfg: OlmoHybridConfig, hf_vocab: int, dtype: torch.dtype, eos: int | None, pad: int | None
) -> dict:
    """config.json: hf_mapping's fields plus dtype and the defaults transformers writes."""
    import transformers

    d = hf_config_dict(cfg, vocab_size=hf_vocab)
    if cfg.rope_theta is None:
        d["rope_parameters"] = {"rope_theta": None}  # NoPE, as the released checkpoint says
    d["eos_token_id"], d["pad_token_id"] = eos, pad
    d.update(
        attention_bias=False,
        attention_dropout=0.0,
        use_cache=True,
        dtype=DTYPE_NAMES[dtype],
        torch_dtype=DTYPE_NAMES[dtype],  # what readers older than transformers 5 look for
        transformers_version=transformers.__version__,
    )
    return d


# ---------------------------------------------------------------------------------------------
# tokenizer


@dataclass
class TokenizerExport:
    files: list[str] = field(default_factory=list)
    vocab_size: int | None = None
    eos: int | None = None
    pad: int | None = None
    hf_loadable: bool = False
    note: str = ""


def export_tokenizer(tokenizer_model: str, out_dir: str) -> TokenizerExport:
    """Copy a sentencepiece model (``tokenizer.model``) and, where it converts exactly, add a
    transformers tokenizer (``tokenizer.json`` + ``tokenizer_config.json``) that encodes like it.
    An HF tokenizer (directory or hub name) is written with its own ``save_pretrained``."""
    res = TokenizerExport()
    if not os.path.isfile(tokenizer_model):
        # An HF tokenizer: a directory, or a hub name transformers can resolve (cache/online),
        # as the trainer's --tokenizer-type HuggingFaceTokenizer accepts.
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(tokenizer_model)
        except (OSError, ValueError) as e:
            raise ConversionError(
                f"--tokenizer-model {tokenizer_model}: neither a sentencepiece file nor a "
                f"tokenizer transformers can load ({type(e).__name__}: {str(e)[:200]})"
            ) from None
        before = set(os.listdir(out_dir))
        tok.save_pretrained(out_dir)
        res.files = sorted(set(os.listdir(out_dir)) - before)
        res.vocab_size, res.eos, res.pad = len(tok), tok.eos_token_id, tok.pad_token_id
        res.hf_loadable, res.note = True, "HF tokenizer saved with save_pretrained"
        return res
    import sentencepiece as spm

    try:
        sp = spm.SentencePieceProcessor(model_file=tokenizer_model)
    except (RuntimeError, OSError) as e:
        raise ConversionError(
            f"--tokenizer-model {tokenizer_model}: not a sentencepiece model: {e}"
        ) from None
    shutil.copyfile(tokenizer_model, os.path.join(out_dir, "tokenizer.model"))
    res.files = ["tokenizer.model"]
    res.vocab_size = sp.get_piece_size()
    res.eos = sp.eos_id() if sp.eos_id() >= 0 else None
    res.pad = sp.pad_id() if sp.pad_id() >= 0 else None
    try:
        res.files += _sentencepiece_to_hf(tokenizer_model, sp, out_dir)
        res.hf_loadable = True
        res.note = (
            "tokenizer.model copied; tokenizer.json + tokenizer_config.json converted "
            "(AutoTokenizer encodes like sentencepiece on the probe texts)"
        )
    except Exception as e:  # noqa: BLE001 - the copied tokenizer.model is the fallback
        res.note = (
            f"tokenizer.model copied; no transformers tokenizer ({type(e).__name__}: "
            f"{str(e)[:200]}); load it with sentencepiece"
        )
    return res


TOKENIZER_PROBES = (
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "def f(x):\n    return x ** 2  # comment\n\n\tindented\r\n",
    "  leading and trailing spaces   ",
    "numbers 1234567890 3.14159 -42",
    "ünïcödé, 日本語, emoji 🙂, accents: café naïve",
    "special-looking text <s> </s> <unk> <pad>",
)


def _sentencepiece_to_hf(path: str, sp, out_dir: str) -> list[str]:
    """tokenizer.json/tokenizer_config.json from the sentencepiece model (transformers builds the
    same normalizer, pre-tokenizer and BPE/unigram model from the proto), checked to encode the
    probe texts exactly like ``sp.encode`` with no BOS/EOS added (as our preprocessing does).
    Special-looking text is tokenized as text (``split_special_tokens``), also as sentencepiece
    does."""
    import tempfile

    from transformers import AutoTokenizer
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    with tempfile.TemporaryDirectory() as tmp:
        shutil.copyfile(path, os.path.join(tmp, "tokenizer.model"))
        extra = {}
        if sp.pad_id() >= 0:
            extra["pad_token"] = sp.id_to_piece(sp.pad_id())
        tok = TokenizersBackend.from_pretrained(tmp, split_special_tokens=True, **extra)
        tok.save_pretrained(tmp)
        written = sorted(f for f in os.listdir(tmp) if f != "tokenizer.model")
        hf = AutoTokenizer.from_pretrained(tmp)
        for text in TOKENIZER_PROBES:
            a, b = sp.encode(text), hf.encode(text, add_special_tokens=False)
            if a != b:
                raise ValueError(f"encodes {text[:30]!r} differently: {a[:8]} vs {b[:8]}")
        if len(hf) != sp.get_piece_size():
            raise ValueError(f"{len(hf)} tokens, sentencepiece has {sp.get_piece_size()}")
        for f in written:
            shutil.copyfile(os.path.join(tmp, f), os.path.join(out_dir, f))
    return written


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

    from megatron_hybrid.models.olmo_hybrid.hf_compare import compare_logits, random_batch

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
) -> ExportResult:
    """Our checkpoint -> HF directory (then validated unless ``validate=False``). Initialises a
    one-process megatron parallel state if none exists."""
    path, _ = resolve_checkpoint(load, iteration)
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


def format_error(e: BaseException) -> str:
    """One line for ``error: ...`` (KeyError's repr quotes are dropped)."""
    msg = e.args[0] if e.args else str(e)
    return str(msg).splitlines()[0] if str(msg) else type(e).__name__


ERRORS = (ConversionError, ConfigError, KeyError, ValueError, FileNotFoundError)


# ---------------------------------------------------------------------------------------------
# command lines (tools/convert_to_hf.py, tools/convert_from_hf.py)


def _cpu_single_process(prog: str) -> None:
    """Conversion runs in one process on CPU (fp32 validation against transformers on CPU)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConversionError(f"{prog} runs in one process: start it without torchrun/srun")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""


def _shard_bytes(text: str) -> int:
    units = {"KB": 1000, "MB": 1000**2, "GB": 1000**3, "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3}
    t = text.strip().upper()
    for u in sorted(units, key=len, reverse=True):
        if t.endswith(u):
            return int(float(t[: -len(u)]) * units[u])
    return int(t)


def parse_to_hf_args(argv=None):
    import argparse

    p = argparse.ArgumentParser(
        prog="convert_to_hf.py",
        description="Export a megatron-hybrid checkpoint (saved at any TP/PP/VP layout) to a "
        "transformers olmo_hybrid directory, then check its logits against ours.",
    )
    p.add_argument("--load", required=True, help="checkpoint root (with its tracker) or iter_N dir")
    p.add_argument("--iteration", type=int, default=None, help="default: the tracker's latest")
    p.add_argument("--save", required=True, help="HF output directory (new or empty)")
    p.add_argument(
        "--tokenizer-model",
        default=None,
        help="sentencepiece .model (copied, plus a converted tokenizer.json) or HF tokenizer dir",
    )
    p.add_argument(
        "--dtype",
        choices=["auto", "bf16", "fp32"],
        default="auto",
        help="weights dtype in the export (auto: as the checkpoint stores them)",
    )
    p.add_argument(
        "--hf-vocab-size",
        default=None,
        help="keep only this many vocabulary rows (a number, or 'tokenizer' for the tokenizer's "
        "size); default: all rows of the checkpoint, padding included (as Olmo releases do)",
    )
    p.add_argument("--max-shard-size", default="5GB", help="per safetensors file (default 5GB)")
    p.add_argument("--skip-validation", action="store_true", help="do not load it back and compare")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main_to_hf(argv=None) -> int:
    import sys

    args = parse_to_hf_args(argv)
    try:
        _cpu_single_process("convert_to_hf.py")
        res = export_to_hf(
            args.load,
            args.save,
            iteration=args.iteration,
            dtype=args.dtype,
            tokenizer_model=args.tokenizer_model,
            hf_vocab_size=args.hf_vocab_size,
            validate=not args.skip_validation,
            max_shard_bytes=_shard_bytes(args.max_shard_size),
            progress=not args.no_progress,
            log=lambda s: print(s, flush=True),
        )
    except ERRORS as e:
        print(f"error: {format_error(e)}", file=sys.stderr, flush=True)
        return 2
    finally:
        _destroy()
    if res.parity is None:
        print("validation skipped (--skip-validation)")
        return 0
    r = res.parity
    print(
        f"validation vs transformers (fp32, CPU): max |diff| {r.max_abs_diff:.3e}  mean |diff| "
        f"{r.mean_abs_diff:.3e}  cosine {r.cosine:.6f}  next-token agreement "
        f"{r.top1_agreement:.4f}"
    )
    g = res.greedy
    tie = f" (then a near-tie at step {g.tie_at + 1}, accepted)" if g.tie_at is not None else ""
    print(
        f"greedy generation ({g.prompt_tokens}-token prompt): {g.equal}/{g.new_tokens} new "
        f"tokens equal to transformers' generate(){tie}"
    )
    if r.logits_ok and g.ok:
        print(
            f"VALIDATION OK: {args.save} loads with AutoModelForCausalLM; logits match "
            "(assert_close 1e-4) and greedy generation matches"
        )
        return 0
    why = [] if r.logits_ok else ["logits differ beyond assert_close(rtol=1e-4, atol=1e-4)"]
    why += [] if g.ok else ["greedy generation differs"]
    print(f"VALIDATION FAIL: {'; '.join(why)}")
    return 1


def parse_from_hf_args(argv=None):
    import argparse

    p = argparse.ArgumentParser(
        prog="convert_from_hf.py",
        description="Import a transformers olmo_hybrid directory as a weights-only "
        "megatron-hybrid checkpoint that megatron-hybrid-train --load continues from.",
    )
    p.add_argument("--hf-model", required=True, help="HF directory (config.json + safetensors)")
    p.add_argument("--save", required=True, help="checkpoint root to write (<save>/iter_0000000)")
    p.add_argument(
        "--tensor-model-parallel-size",
        type=int,
        default=1,
        help="check the model splits at this TP (and pad the vocabulary to a multiple of it); "
        "the checkpoint itself loads at any layout",
    )
    p.add_argument(
        "--pipeline-model-parallel-size",
        type=int,
        default=1,
        help="check the blocks split evenly into this many pipeline stages",
    )
    return p.parse_args(argv)


def main_from_hf(argv=None) -> int:
    import sys

    args = parse_from_hf_args(argv)
    try:
        _cpu_single_process("convert_from_hf.py")
        res = import_from_hf(
            args.hf_model,
            args.save,
            tensor_parallel=args.tensor_model_parallel_size,
            pipeline_parallel=args.pipeline_model_parallel_size,
            log=lambda s: print(s, flush=True),
        )
    except ERRORS as e:
        print(f"error: {format_error(e)}", file=sys.stderr, flush=True)
        return 2
    finally:
        _destroy()
    print(
        f"continue pretraining with: megatron-hybrid-train --config {res.checkpoint}/"
        f"run_config.json --load {args.save} --save DIR ... (weights only: fresh optimizer, "
        "schedule from iteration 0)"
    )
    return 0


def _destroy() -> None:
    from megatron_hybrid.parallel import state

    state.destroy()
