"""HF ``olmo_hybrid`` directories on disk: ``config.json``, safetensors files and their index,
and the on-disk tensor names transformers may write (normalised to the released layout).
"""

from __future__ import annotations

import json
import os

import torch

from megatron_hybrid.conversion.saved_checkpoints import DTYPE_NAMES, ConversionError
from megatron_hybrid.models.olmo_hybrid.config import OlmoHybridConfig
from megatron_hybrid.models.olmo_hybrid.hf_mapping import hf_config_dict, split_fused_conv

DEFAULT_MAX_SHARD_BYTES = 5 * 1000**3
INDEX_FILE = "model.safetensors.index.json"

# transformers loads these on-disk names under its in-memory ones (``conversion_mapping.py``:
# WeightRenaming for olmo_hybrid) and ``save_pretrained`` writes them back out, so directories
# saved by transformers carry them; the released checkpoint uses the in-memory names.
LEGACY_HF_NAMES = (
    (".attention_layer_norm.", ".input_layernorm."),
    (".feedforward_layer_norm.", ".post_attention_layernorm."),
)


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
