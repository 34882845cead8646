"""Tokenizers behind one small interface: encode, decode, eod, vocab_size.

``eod`` (end of document) is the tokenizer's EOS id: appended after every document by
preprocessing and used to find document boundaries in packed training sequences.
"""

from __future__ import annotations

import os


class SentencePieceTokenizer:
    def __init__(self, model_path: str):
        import sentencepiece as spm

        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"sentencepiece model not found: {model_path}")
        self.path = model_path
        self.sp = spm.SentencePieceProcessor(model_file=model_path)
        if self.sp.eos_id() < 0:
            raise ValueError(
                f"{model_path}: the sentencepiece model has no EOS piece (needed as EOD)"
            )

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def eod(self) -> int:
        return self.sp.eos_id()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids if int(i) < self.vocab_size])


class HuggingFaceTokenizer:
    def __init__(self, name_or_path: str):
        from transformers import AutoTokenizer

        self.path = name_or_path
        self.tok = AutoTokenizer.from_pretrained(name_or_path)
        if self.tok.eos_token_id is None:
            raise ValueError(f"{name_or_path}: tokenizer has no eos token (needed as EOD)")

    @property
    def vocab_size(self) -> int:
        return len(self.tok)

    @property
    def eod(self) -> int:
        return self.tok.eos_token_id

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids])


TOKENIZER_TYPES = {
    "SentencePieceTokenizer": SentencePieceTokenizer,
    "HuggingFaceTokenizer": HuggingFaceTokenizer,
}


def build_tokenizer(tokenizer_type: str, tokenizer_model: str):
    if tokenizer_type not in TOKENIZER_TYPES:
        raise ValueError(
            f"--tokenizer-type {tokenizer_type!r}: choose one of {', '.join(TOKENIZER_TYPES)}"
        )
    if not tokenizer_model:
        raise ValueError(f"--tokenizer-type {tokenizer_type} needs --tokenizer-model")
    return TOKENIZER_TYPES[tokenizer_type](tokenizer_model)


def padded_vocab_size(vocab: int, divisible_by: int, tensor_parallel: int) -> int:
    """Megatron's rule: pad to a multiple of ``divisible_by * TP``."""
    multiple = divisible_by * tensor_parallel
    return -(-vocab // multiple) * multiple
