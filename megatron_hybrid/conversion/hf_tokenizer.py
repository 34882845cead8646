"""The tokenizer of an HF export: a sentencepiece model copied (plus, where it converts exactly, a
transformers ``tokenizer.json``), or an HF tokenizer written with its own ``save_pretrained``.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field

from megatron_hybrid.conversion.saved_checkpoints import ConversionError


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
