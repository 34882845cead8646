"""Preprocessing (jsonl -> indexed dataset), tokenizer training, and training on the result."""

from __future__ import annotations

import json

import numpy as np
import pytest

from megatron_hybrid.data.preprocess import CorpusError, preprocess
from megatron_hybrid.data.tokenizer_training import train_sentencepiece
from tests.conftest import parse_losses, run_python, train_cmd

DOCS = [f"def function_{i}(x):\n    return x * {i} + {i * i}  # number {i}\n" for i in range(300)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    path = d / "docs.jsonl"
    with open(path, "w") as f:
        for text in DOCS:
            f.write(json.dumps({"text": text}) + "\n")
    tok = train_sentencepiece([str(path)], str(d / "tok"), vocab_size=300)
    return d, path, tok


def test_preprocess_writes_megatron_indexed_dataset(corpus):
    from megatron_hybrid import mcore
    from megatron_hybrid.data.tokenizers import SentencePieceTokenizer

    d, path, tok = corpus
    summary = preprocess(
        [str(path)],
        str(d / "out"),
        "SentencePieceTokenizer",
        tok,
        workers=2,
        append_eod=True,
        progress=False,
    )
    assert summary.documents == len(DOCS) and not summary.skipped
    ds = mcore.IndexedDataset(str(d / "out_text_document"))
    assert len(ds) == len(DOCS) and ds.index.dtype == np.uint16
    t = SentencePieceTokenizer(tok)
    first = ds[0]
    assert first[-1] == t.eod and t.decode(first[:-1]) == DOCS[0]


def test_bad_lines_are_skipped_and_reported_with_line_numbers(corpus, tmp_path):
    d, path, tok = corpus
    bad = tmp_path / "bad.jsonl"
    lines = [
        b'{"text": "good one"}',
        b"{not json",
        b'{"body": "x"}',
        b'{"text": ""}',
        b'{"text": "\xff\xfe"}',
        b'{"text": 5}',
        b'{"text": "good two"}',
    ]
    bad.write_bytes(b"\n".join(lines) + b"\n")
    s = preprocess([str(bad)], str(tmp_path / "o"), "SentencePieceTokenizer", tok, progress=False)
    assert s.documents == 2
    assert s.skipped == {
        "malformed JSON": 1,
        "missing key 'text'": 1,
        "empty document": 1,
        "invalid UTF-8": 1,
        "key 'text' is not a string": 1,
    }
    assert s.examples["malformed JSON"] == [f"{bad}:2"]
    assert f"{bad}:5" in s.report()
    with pytest.raises(CorpusError, match=f"{bad}:2: malformed JSON"):
        preprocess(
            [str(bad)],
            str(tmp_path / "o2"),
            "SentencePieceTokenizer",
            tok,
            strict=True,
            progress=False,
        )
    assert not (tmp_path / "o2_text_document.bin").exists()


def test_missing_input_is_a_clear_error(tmp_path, corpus):
    _, _, tok = corpus
    proc = run_python(
        [
            "tools/preprocess_data.py",
            "--input",
            str(tmp_path / "nope*.jsonl"),
            "--output-prefix",
            str(tmp_path / "x"),
            "--tokenizer-type",
            "SentencePieceTokenizer",
            "--tokenizer-model",
            tok,
        ]
    )
    assert proc.returncode == 2 and "no such file" in proc.stderr and "Traceback" not in proc.stderr


def test_train_on_preprocessed_data_with_document_masking(corpus):
    d, path, tok = corpus
    preprocess([str(path)], str(d / "train"), "SentencePieceTokenizer", tok, progress=False)
    args = [
        "--preset",
        "tiny",
        "--data-path",
        str(d / "train_text_document"),
        "--tokenizer-type",
        "SentencePieceTokenizer",
        "--tokenizer-model",
        tok,
        "--seq-length",
        "64",
        "--global-batch-size",
        "4",
        "--micro-batch-size",
        "2",
        "--train-iters",
        "8",
        "--lr",
        "3e-3",
        "--eval-interval",
        "8",
        "--eval-iters",
        "1",
        "--data-cache-path",
        str(d / "cache"),
    ]
    proc = run_python(train_cmd(*args))
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = parse_losses(proc.stdout)
    assert losses[8][0] < losses[1][0]
    assert "vocab 384" in proc.stdout  # 300 pieces padded to a multiple of 128
    assert "validation loss at iteration 8" in proc.stdout


@pytest.mark.parametrize("damage", ["missing_idx", "truncated_bin", "vocab_too_small"])
def test_dataset_errors_are_named(corpus, tmp_path, damage):
    d, path, tok = corpus
    prefix = tmp_path / "ds"
    preprocess([str(path)], str(prefix), "SentencePieceTokenizer", tok, progress=False)
    p = f"{prefix}_text_document"
    extra, needle = [], ""
    if damage == "missing_idx":
        (tmp_path / "ds_text_document.idx").unlink()
        needle = "ds_text_document.idx not found"
    elif damage == "truncated_bin":
        b = tmp_path / "ds_text_document.bin"
        b.write_bytes(b.read_bytes()[: len(b.read_bytes()) // 2])
        needle = "is truncated"
    else:
        extra, needle = ["--vocab-size", "128"], ">= model vocab_size 128"
    tok_args = (
        [] if extra else ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", tok]
    )
    proc = run_python(
        train_cmd(
            "--preset",
            "tiny",
            "--data-path",
            p,
            *tok_args,
            "--seq-length",
            "64",
            "--global-batch-size",
            "2",
            "--train-iters",
            "1",
            *extra,
        )
    )
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert needle in proc.stderr and "Traceback" not in proc.stderr
