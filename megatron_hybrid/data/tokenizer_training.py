"""Train a sentencepiece BPE tokenizer on a jsonl corpus (the demo needs one; no downloads)."""

from __future__ import annotations

import json
import os
import re
import tempfile


def train_sentencepiece(
    inputs: list[str],
    model_prefix: str,
    vocab_size: int = 4096,
    json_key: str = "text",
    max_sentences: int = 2_000_000,
    character_coverage: float = 1.0,
) -> str:
    """BPE with byte fallback (no unknown bytes); ids: pad 0, unk 1, bos 2, eos 3 (= EOD)."""
    import sentencepiece as spm

    from megatron_hybrid.data.preprocess import expand_inputs

    if vocab_size < 1:
        raise ValueError(f"--vocab-size {vocab_size}: must be >= 1")
    files = expand_inputs(inputs)
    with tempfile.TemporaryDirectory() as tmp:
        text_path = os.path.join(tmp, "corpus.txt")
        n = 0
        with open(text_path, "w", encoding="utf-8") as out:
            for path in files:
                with open(path, "rb") as f:
                    for raw in f:
                        try:
                            text = json.loads(raw.decode("utf-8")).get(json_key)
                        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
                            continue
                        if isinstance(text, str) and text.strip():
                            for line in text.splitlines():
                                if line.strip():
                                    out.write(line + "\n")
                                    n += 1
        if n == 0:
            raise ValueError(f"no text under key {json_key!r} in {inputs}")
        _train(
            spm,
            vocab_size,
            input=text_path,
            model_prefix=model_prefix,
            model_type="bpe",
            character_coverage=character_coverage,
            byte_fallback=True,
            pad_id=0,
            unk_id=1,
            bos_id=2,
            eos_id=3,
            input_sentence_size=max_sentences,
            shuffle_input_sentence=True,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            remove_extra_whitespaces=False,
            normalization_rule_name="identity",
            num_threads=os.cpu_count() or 1,
            minloglevel=2,
        )
    return model_prefix + ".model"


def _train(spm, vocab_size: int, **kwargs) -> None:
    """sentencepiece's trainer, its vocabulary-size failures turned into ValueErrors that say
    what size would work (it raises a RuntimeError quoting its C++ source otherwise)."""
    try:
        spm.SentencePieceTrainer.train(vocab_size=vocab_size, **kwargs)
    except RuntimeError as e:
        msg = str(e)
        small = re.search(r"smaller than required_chars\. \d+ vs (\d+)", msg)
        if small:
            raise ValueError(
                f"--vocab-size {vocab_size} is too small: this corpus needs at least "
                f"{small.group(1)} pieces (4 special ids, 256 byte-fallback pieces and every "
                "character of the corpus)"
            ) from None
        large = re.search(r"Vocabulary size too high \((\d+)\).*?<= (\d+)", msg)
        if large:
            raise ValueError(
                f"--vocab-size {vocab_size} is too large for this corpus: sentencepiece can "
                f"learn at most {large.group(2)} pieces from it (use a smaller size or more text)"
            ) from None
        raise ValueError(f"sentencepiece training failed: {msg.splitlines()[-1]}") from None
