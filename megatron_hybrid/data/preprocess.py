"""jsonl corpus -> megatron-core indexed dataset ``<prefix>_<key>_document.bin/.idx``.

Bad input never silently loses good data: malformed JSON, a missing key, a non-string value or
invalid UTF-8 make that line skipped and *counted with its file and line number*; empty
documents are skipped and counted; ``strict=True`` turns any of these into an error.
"""

from __future__ import annotations

import glob
import json
import multiprocessing as mp
import os
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from megatron_hybrid.data.tokenizers import build_tokenizer

MAX_EXAMPLES = 5  # per problem kind in the summary


class CorpusError(ValueError):
    """Raised for unreadable inputs, and for bad lines under --strict."""


@dataclass
class PreprocessSummary:
    documents: int = 0
    tokens: int = 0
    bytes_read: int = 0
    seconds: float = 0.0
    skipped: dict = field(default_factory=lambda: defaultdict(int))
    examples: dict = field(default_factory=lambda: defaultdict(list))
    outputs: list = field(default_factory=list)

    def skip(self, kind: str, where: str):
        self.skipped[kind] += 1
        if len(self.examples[kind]) < MAX_EXAMPLES:
            self.examples[kind].append(where)

    def report(self) -> str:
        lines = [
            f"documents: {self.documents:,}  tokens: {self.tokens:,}  "
            f"read {self.bytes_read / 1e6:.1f} MB in {self.seconds:.1f} s"
        ]
        if self.skipped:
            lines.append("skipped lines:")
            for kind, n in sorted(self.skipped.items()):
                lines.append(f"  {kind}: {n}  (e.g. {', '.join(self.examples[kind])})")
        else:
            lines.append("skipped lines: none")
        lines += [f"wrote {p}" for p in self.outputs]
        return "\n".join(lines)


def expand_inputs(patterns: list[str]) -> list[str]:
    files = []
    for pattern in patterns:
        matched = sorted(glob.glob(pattern))
        if not matched:
            raise CorpusError(f"--input {pattern!r}: no such file")
        for f in matched:
            if not os.path.isfile(f) or not os.access(f, os.R_OK):
                raise CorpusError(f"--input {f!r}: not a readable file")
        files += matched
    return files


# ---- worker side: parse + tokenize one line ---------------------------------------------------
_TOK = None
_KEYS: list[str] = []
_EOD = False


def _init_worker(tokenizer_type, tokenizer_model, keys, append_eod):
    global _TOK, _KEYS, _EOD
    _TOK = build_tokenizer(tokenizer_type, tokenizer_model)
    _KEYS, _EOD = keys, append_eod


def _encode_line(item):
    """(where, raw bytes) -> (where, {key: ids} | None, problem | None, nbytes)."""
    where, raw = item
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return where, None, f"invalid UTF-8 (byte {e.start})", len(raw)
    if not text.strip():
        return where, None, "blank line", len(raw)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return where, None, f"malformed JSON ({e.msg})", len(raw)
    if not isinstance(obj, dict):
        return where, None, "malformed JSON (not an object)", len(raw)
    out = {}
    for key in _KEYS:
        if key not in obj:
            return where, None, f"missing key {key!r}", len(raw)
        if not isinstance(obj[key], str):
            return where, None, f"key {key!r} is not a string", len(raw)
        ids = _TOK.encode(obj[key])
        if not ids:
            return where, None, f"empty document ({key!r})", len(raw)
        if _EOD:
            ids.append(_TOK.eod)
        out[key] = ids
    return where, out, None, len(raw)


def _lines(files):
    for path in files:
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                yield f"{path}:{lineno}", raw.rstrip(b"\r\n")


def preprocess(
    inputs,
    output_prefix,
    tokenizer_type,
    tokenizer_model,
    json_keys=("text",),
    workers=1,
    append_eod=True,
    strict=False,
    progress=True,
) -> PreprocessSummary:
    from megatron_hybrid import mcore

    files = expand_inputs(list(inputs))
    total_bytes = sum(os.path.getsize(f) for f in files)
    tok = build_tokenizer(tokenizer_type, tokenizer_model)
    # Token dtype as Megatron picks it: uint16 fits vocabularies below 65,500.
    dtype = np.uint16 if tok.vocab_size < 65500 else np.int32
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    if not os.path.isdir(out_dir):
        raise CorpusError(f"--output-prefix: directory {out_dir} does not exist")
    paths = {key: f"{output_prefix}_{key}_document" for key in json_keys}
    builders: dict = {}
    try:
        for key, base in paths.items():
            builders[key] = mcore.IndexedDatasetBuilder(base + ".bin.tmp", dtype=dtype)
        init = (tokenizer_type, tokenizer_model, list(json_keys), append_eod)
        summary = _tokenize_into(builders, files, total_bytes, init, workers, strict, progress)
        if summary.documents == 0:
            raise CorpusError(_nothing_valid(summary, json_keys))
        for key, builder in builders.items():
            builder.finalize(paths[key] + ".idx.tmp")
        for base in paths.values():  # only complete outputs get the real names
            os.replace(base + ".bin.tmp", base + ".bin")
            os.replace(base + ".idx.tmp", base + ".idx")
            summary.outputs.append(base)
    except BaseException:
        # any failure, Ctrl-C included: no half-written <prefix>.bin.tmp is left behind
        _remove_partial(builders, paths)
        raise
    return summary


def _nothing_valid(summary: PreprocessSummary, json_keys) -> str:
    """Why no line made a document: each problem with its count and first lines, so a
    --json-keys typo reads 'missing key 'body': 300 of 300 lines'."""
    lines = summary.documents + sum(summary.skipped.values())
    if not lines:
        return "the input has no lines; nothing written"
    reasons = "; ".join(
        f"{kind}: {n} of {lines} lines (e.g. {', '.join(summary.examples[kind][:2])})"
        for kind, n in sorted(summary.skipped.items(), key=lambda kv: -kv[1])
    )
    return f"no valid documents for --json-keys {' '.join(json_keys)}; nothing written: {reasons}"


def _remove_partial(builders: dict, paths: dict) -> None:
    for key, base in paths.items():
        builder = builders.get(key)
        if builder is not None and not builder.data_file.closed:
            builder.data_file.close()
        for path in (base + ".bin.tmp", base + ".idx.tmp"):
            if os.path.exists(path):
                os.remove(path)


def _tokenize_into(builders, files, total_bytes, init, workers, strict, progress):
    """Tokenize every line of ``files`` into the builders (skips counted in the summary);
    ``init`` = the workers' (tokenizer type, model, json keys, append_eod)."""
    dtype = next(iter(builders.values())).dtype
    summary = PreprocessSummary()
    start = time.time()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(
            total=total_bytes,
            unit="B",
            unit_scale=True,
            desc="tokenizing",
            file=sys.stderr,
            mininterval=0.5,
        )
    pool = None
    try:
        if workers > 1:
            pool = mp.get_context("fork").Pool(workers, _init_worker, init)
            results = pool.imap(_encode_line, _lines(files), chunksize=64)
        else:
            _init_worker(*init)
            results = map(_encode_line, _lines(files))
        for where, docs, problem, nbytes in results:
            summary.bytes_read += nbytes + 1
            if problem is not None:
                if strict:
                    raise CorpusError(f"{where}: {problem} (--strict)")
                summary.skip(problem.split(" (")[0], where)
            else:
                for key, ids in docs.items():
                    builders[key].add_document(np.asarray(ids, dtype=dtype), [len(ids)])
                    summary.tokens += len(ids)
                summary.documents += 1
            if bar is not None:
                bar.update(nbytes + 1)
                if summary.documents % 256 == 0:
                    el = max(time.time() - start, 1e-9)
                    bar.set_postfix(
                        docs_s=f"{summary.documents / el:.0f}",
                        MB_s=f"{summary.bytes_read / el / 1e6:.1f}",
                    )
        if pool is not None:
            pool.close()
            pool.join()
            pool = None
    finally:
        if pool is not None:  # failed mid-way: do not leave workers tokenizing
            pool.terminate()
        if bar is not None:
            bar.close()
    summary.seconds = time.time() - start
    return summary
