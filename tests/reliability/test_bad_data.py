"""Issue 20 ("Nothing silent"), data side: sample order from consumed samples (resume with
another batch size, --rampup-batch-size), indexed datasets checked exactly, splits too small
for a sample (used to hang), generation past the trained length, tokenizer and preprocessing
failures. Every failure is one ``error: ...`` line, exit 2, no traceback."""

from __future__ import annotations

import json
import re
import struct

import numpy as np
import pytest

from megatron_hybrid.data import batches
from megatron_hybrid.data.preprocess import CorpusError, preprocess
from megatron_hybrid.data.tokenizer_training import train_sentencepiece
from tests.conftest import TINY_MOCK, concurrently, run_python, train_cmd

DOCS = [f"def function_{i}(x):\n    return x * {i} + {i * i}  # number {i}\n" for i in range(120)]


def _one_error(proc, *needles: str) -> str:
    """Exit 2, exactly one ``error:`` line holding every needle, no traceback."""
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def _write_jsonl(path, texts, key="text"):
    with open(path, "w") as f:
        for text in texts:
            f.write(json.dumps({key: text}) + "\n")
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A tokenizer and an indexed dataset of DOCS (prefix ``.../good_text_document``)."""
    d = tmp_path_factory.mktemp("bad_data")
    src = _write_jsonl(d / "docs.jsonl", DOCS)
    tok = train_sentencepiece([str(src)], str(d / "tok"), vocab_size=300)
    preprocess([str(src)], str(d / "good"), "SentencePieceTokenizer", tok, progress=False)
    return d, tok, str(d / "good_text_document")


def _train_args(prefix: str, tok: str, *extra: str) -> list[str]:
    return train_cmd(
        "--preset", "tiny", "--data-path", prefix, "--tokenizer-type", "SentencePieceTokenizer",
        "--tokenizer-model", tok, "--seq-length", "32", "--global-batch-size", "2",
        "--train-iters", "1", *extra,
    )  # fmt: skip


# ---- 1. data order from consumed samples ------------------------------------------------------


def test_indices_come_from_consumed_samples_across_a_batch_size_change():
    """Steps of 8 then (after a resume) of 16 read every sample once, in order, at DP 2."""
    read, consumed = [], 0
    for gbs in [8] * 6 + [16] * 3:
        for rank in range(2):
            mbs = batches.global_batch_indices(consumed, gbs, rank, 2, 2)
            assert all(len(mb) == 2 for mb in mbs)
            read += [i for mb in mbs for i in mb]
        consumed += gbs
    assert read == list(range(96)) and consumed == 96
    # rank 1 of the first 16-batch after 48 samples: [56, 64) in micro-batches of 2
    assert batches.global_batch_indices(48, 16, 1, 2, 2) == [[56, 57], [58, 59], [60, 61], [62, 63]]


def test_rampup_sizes_follow_megatron():
    """start 2, +2 over 10 samples to 8: Megatron-LM's RampupBatchsizeNumMicroBatchesCalculator
    gives 2 + 2 * int(consumed / (10 / 3)) while consumed <= 10."""
    sizes, consumed = [], 0
    for _ in range(6):
        sizes.append(batches.global_batch_size_at(consumed, 8, (2, 2, 10)))
        consumed += sizes[-1]
    assert sizes == [2, 2, 4, 6, 8, 8]
    assert batches.samples_after_steps(6, 8, (2, 2, 10)) == 30
    assert batches.samples_after_steps(1000, 8, (2, 2, 10)) == 30 + 994 * 8
    assert batches.samples_after_steps(2, 8, (2, 2, 10), consumed=4) == 4 + 4 + 6
    assert batches.samples_after_steps(5, 8) == 40
    assert batches.global_batch_size_at(5, 8, (8, 4, 100)) == 8  # START = final: constant


def test_train_dataset_order_does_not_depend_on_its_requested_size(corpus, tmp_path):
    """A resume with another batch size builds the train split for a different number of
    samples; within one epoch megatron's GPTDataset gives the same sample i either way (its
    shuffle spans the whole epoch), so consumed-sample indices keep meaning the same data."""
    from types import SimpleNamespace

    _, _, good = corpus
    cfg = SimpleNamespace(mock=False, data_path=[good], split="100,0,0", seq_length=16,
                          cache_dir=str(tmp_path), document_masking=True)  # fmt: skip
    small, _ = batches.build_datasets(cfg, 7, 20, 1, 512, 3, with_valid=False)
    large, _ = batches.build_datasets(cfg, 7, 90, 1, 512, 3, with_valid=False)
    for i in range(20):
        assert np.array_equal(small[i]["tokens"], large[i]["tokens"]), i


SAMPLES_RE = re.compile(r"samples of iteration (\d+) on DP rank 0: ([\d,]+)")
CONSUMED_RE = re.compile(
    r"iteration\s+(\d+)/.*?consumed samples:\s+(\d+).*?global batch size:\s+(\d+)"
)


def _trace(proc) -> tuple[dict, dict]:
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    read = {int(i): [int(x) for x in s.split(",")] for i, s in SAMPLES_RE.findall(proc.stdout)}
    logged = {int(i): (int(c), int(g)) for i, c, g in CONSUMED_RE.findall(proc.stdout)}
    return read, logged


def test_rampup_then_resume_with_another_batch_size_reads_every_sample_once(tmp_path, monkeypatch):
    """Run 1 ramps 2 -> 4 -> 6 (--rampup-batch-size 2 2 4, 3 steps) and saves; run 2 resumes
    with --global-batch-size 4: the samples read are exactly 0, 1, 2, ... with no gap or repeat,
    and the log's consumed samples and global batch size say the same."""
    monkeypatch.setenv("MEGATRON_HYBRID_TRACE_SAMPLES", "1")
    base = [a for a in TINY_MOCK if a not in ("--deterministic",)]
    ckpt = str(tmp_path / "ckpt")
    first = run_python(train_cmd(
        *base, "--seq-length", "16", "--global-batch-size", "6", "--rampup-batch-size", "2", "2",
        "4", "--train-iters", "5", "--exit-interval", "3", "--save", ckpt,
    ))  # fmt: skip
    read1, logged1 = _trace(first)
    assert read1 == {1: [0, 1], 2: [2, 3, 4, 5], 3: list(range(6, 12))}
    assert logged1 == {1: (2, 2), 2: (6, 4), 3: (12, 6)}
    second = run_python(train_cmd(
        *base, "--seq-length", "16", "--global-batch-size", "4", "--train-iters", "5",
        "--load", ckpt,
    ))  # fmt: skip
    read2, logged2 = _trace(second)
    assert read2 == {4: list(range(12, 16)), 5: list(range(16, 20))}
    assert logged2 == {4: (16, 4), 5: (20, 4)}


# ---- 3. the index checked against the data file -----------------------------------------------


def _rewrite_idx(path, code=None, pointer_shift=0):
    raw = bytearray(open(path, "rb").read())
    if code is not None:
        raw[17] = code
    if pointer_shift:
        n = struct.unpack("<Q", raw[18:26])[0]
        at = 34 + 4 * n + 8 * (n - 1)  # the last sequence pointer
        last = struct.unpack("<q", raw[at : at + 8])[0]
        raw[at : at + 8] = struct.pack("<q", last + pointer_shift)
    open(path, "wb").write(bytes(raw))


@pytest.mark.parametrize(
    "damage, needles",
    [
        ("bin_of_a_larger_corpus", ["big.bin has", "ends its last document at byte",
                                    "not from the same preprocessing run"]),
        ("garbage_idx", ["big.idx is not a megatron index (bad header)"]),
        ("bad_dtype_code", ["big.idx has dtype code 42"]),
        ("truncated_idx", ["big.idx is", "needs exactly"]),
        ("pointer_past_the_end", ["big.bin is truncated", "big.idx expects"]),
        ("truncated_bin", ["big.bin is truncated"]),
    ],
)  # fmt: skip
def test_index_is_checked_against_its_data_file(corpus, tmp_path, damage, needles):
    d, _, good = corpus
    prefix = tmp_path / "big"
    idx, binf = tmp_path / "big.idx", tmp_path / "big.bin"
    idx.write_bytes(open(good + ".idx", "rb").read())
    binf.write_bytes(open(good + ".bin", "rb").read())
    if damage == "bin_of_a_larger_corpus":  # e.g. 20 more documents' worth of tokens
        binf.write_bytes(binf.read_bytes() + np.arange(200, dtype=np.uint16).tobytes())
    elif damage == "garbage_idx":
        idx.write_bytes(b"\x13\x37" * 500)
    elif damage == "bad_dtype_code":
        _rewrite_idx(idx, code=42)
    elif damage == "truncated_idx":
        idx.write_bytes(idx.read_bytes()[:-9])
    elif damage == "pointer_past_the_end":
        _rewrite_idx(idx, pointer_shift=1 << 20)
    else:
        binf.write_bytes(binf.read_bytes()[:-2])
    with pytest.raises(ValueError) as e:
        batches.check_indexed_dataset(str(prefix), 512)
    for needle in needles:
        assert needle in str(e.value)
    assert f"--data-path {prefix}" in str(e.value)


@pytest.mark.parametrize("damage", ["bin_of_a_larger_corpus", "garbage_idx"])
def test_bad_index_stops_the_trainer_with_one_line(corpus, tmp_path, damage):
    """The real run: one line, and no stray 'Exception ignored in IndexedDataset.__del__'."""
    d, tok, good = corpus
    (tmp_path / "big.idx").write_bytes(open(good + ".idx", "rb").read())
    data = open(good + ".bin", "rb").read()
    (tmp_path / "big.bin").write_bytes(data + data)
    if damage == "garbage_idx":
        (tmp_path / "big.idx").write_bytes(b"not an index at all")
    proc = run_python(_train_args(str(tmp_path / "big"), tok), timeout=120)
    _one_error(proc, f"--data-path {tmp_path / 'big'}", "big.idx")


# ---- 4. splits too small for a sample (megatron's builder used to spin forever) ---------------


@pytest.fixture(scope="module")
def one_huge_document(corpus):
    d, tok, _ = corpus
    src = _write_jsonl(d / "huge.jsonl", ["".join(DOCS)])
    preprocess([str(src)], str(d / "huge"), "SentencePieceTokenizer", tok, progress=False)
    return str(d / "huge_text_document")


@pytest.mark.parametrize(
    "extra, needles",
    [
        (["--split", "99,1,0", "--eval-interval", "1", "--eval-iters", "1"],
         ["--split 99,1,0 gives the valid split 0 of 1 documents (0 tokens)",
          "one sample needs seq_length + 1 = 33 tokens"]),
        (["--split", "1,99,0"], ["gives the train split 0 of 1 documents"]),
        (["--split", "100,0,0", "--seq-length", "100000", "--max-position-embeddings", "100000"],
         ["gives the train split 1 of 1 documents", "needs seq_length + 1 = 100,001 tokens"]),
    ],
)  # fmt: skip
def test_too_small_split_fails_fast_instead_of_hanging(corpus, one_huge_document, extra, needles):
    _, tok, _ = corpus
    # timeout: before the check, megatron's GPTDataset._get_num_epochs looped forever here
    proc = run_python(_train_args(one_huge_document, tok, *extra), timeout=120)
    _one_error(proc, f"--data-path {one_huge_document}", *needles)


def test_split_sizes_unit(one_huge_document):
    """The rule in-process: each built split needs a document and seq_length + 1 tokens."""
    matrix = [(0.0, 0.99), (0.99, 1.0), None]
    with pytest.raises(ValueError, match="valid split 0 of 1 documents"):
        batches.check_split_sizes(one_huge_document, "99,1,0", matrix, 32)
    batches.check_split_sizes(one_huge_document, "99,1,0", [matrix[0], None, None], 32)
    # enough tokens for a sample, but a billion samples would mean millions of passes
    with pytest.raises(ValueError, match=r"would be repeated [\d,]+ times for 1,000,000,000"):
        batches.check_split_sizes(
            one_huge_document, "100,0,0", [(0.0, 1.0), None, None], 32, (10**9, None, None)
        )
    batches.check_split_sizes(
        one_huge_document, "100,0,0", [(0.0, 1.0), None, None], 32, (1000, None, None)
    )


def test_unused_empty_valid_split_does_not_block_training(corpus, one_huge_document):
    """Without --eval-interval nothing reads the validation split: it is not built, and the
    one-document corpus trains (it used to hang on the empty valid split)."""
    _, tok, _ = corpus
    proc = run_python(_train_args(one_huge_document, tok, "--split", "99,1,0"), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "iteration        1/       1" in proc.stdout


# ---- 7. generation past the trained length ----------------------------------------------------


def test_generate_warns_past_the_trained_length(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    proc = run_python(train_cmd(
        *TINY_MOCK, "--seq-length", "16", "--max-position-embeddings", "24", "--train-iters",
        "1", "--lr-warmup-iters", "0", "--save", ckpt,
    ))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    ids = ",".join(str(i) for i in range(1, 21))  # 20 prompt tokens
    gen, short = concurrently(  # two independent 1-rank processes: at the same time
        lambda: run_python(["tools/generate.py", "--load", ckpt, "--prompt-ids", ids,
                            "--max-new-tokens", "8"]),
        lambda: run_python(["tools/generate.py", "--load", ckpt, "--prompt-ids", "1,2,3",
                            "--max-new-tokens", "4"]),
    )  # fmt: skip
    assert gen.returncode == 0, gen.stderr[-3000:]
    warnings = [ln for ln in gen.stderr.splitlines() if ln.startswith("warning: ")]
    assert warnings == [
        "warning: prompt of 20 tokens + up to 8 new tokens = 28 positions, beyond "
        "max_position_embeddings 24 and the trained sequence length 16: the model was not "
        "trained on such lengths, expect degraded output"
    ], gen.stderr[-2000:]
    assert "GENERATED ids=" in gen.stdout
    assert short.returncode == 0 and "warning:" not in short.stderr


# ---- 8. tokenizer vocabulary too small ---------------------------------------------------------


@pytest.mark.parametrize(
    "vocab, needles",
    [
        ("100", ["--vocab-size 100 is too small: this corpus needs at least"]),
        ("100000", ["--vocab-size 100000 is too large for this corpus"]),
        ("0", ["--vocab-size 0: must be >= 1"]),
    ],
)
def test_tokenizer_vocab_size_errors(corpus, tmp_path, vocab, needles):
    d, _, _ = corpus
    proc = run_python([
        "tools/train_tokenizer.py", "--input", str(d / "docs.jsonl"), "--model-prefix",
        str(tmp_path / "t"), "--vocab-size", vocab,
    ])  # fmt: skip
    _one_error(proc, *needles)


# ---- 9. preprocessing failures -----------------------------------------------------------------


def test_missing_json_key_is_named_with_its_count(corpus, tmp_path):
    d, tok, _ = corpus
    proc = run_python([
        "tools/preprocess_data.py", "--input", str(d / "docs.jsonl"), "--json-keys", "body",
        "--output-prefix", str(tmp_path / "out"), "--tokenizer-type", "SentencePieceTokenizer",
        "--tokenizer-model", tok, "--no-progress",
    ])  # fmt: skip
    _one_error(proc, "--json-keys body", f"missing key 'body': {len(DOCS)} of {len(DOCS)} lines",
               "docs.jsonl:1")  # fmt: skip
    assert list(tmp_path.iterdir()) == []  # nothing written, no .bin.tmp


@pytest.mark.parametrize("failure", [KeyboardInterrupt, CorpusError, OSError])
def test_failed_preprocessing_leaves_no_partial_files(corpus, tmp_path, monkeypatch, failure):
    """Ctrl-C (or any error) mid-way: no <prefix>_text_document.bin.tmp / .idx.tmp left."""
    from megatron_hybrid.data import preprocess as pp

    d, tok, _ = corpus
    real, seen = pp._encode_line, []

    def encode_then_fail(item):
        seen.append(item)
        if len(seen) == 50:
            raise failure("stop here")
        return real(item)

    monkeypatch.setattr(pp, "_encode_line", encode_then_fail)
    with pytest.raises(failure):
        preprocess([str(d / "docs.jsonl")], str(tmp_path / "out"), "SentencePieceTokenizer",
                   tok, progress=False)  # fmt: skip
    assert len(seen) == 50 and list(tmp_path.iterdir()) == []
