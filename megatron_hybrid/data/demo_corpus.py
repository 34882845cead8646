"""A real-text corpus available on every machine: the running interpreter's standard library.

Each ``.py`` file of the stdlib becomes one jsonl document (source code and docstrings: real,
varied English + code). Deterministic order; size capped so the demo stays CPU-friendly.
"""

from __future__ import annotations

import json
import os
import sysconfig


def build_stdlib_corpus(
    out_path: str,
    max_bytes: int = 8_000_000,
    max_file_bytes: int = 200_000,
    site_packages: bool = False,
) -> dict:
    """``site_packages=True`` adds the installed packages' sources after the stdlib's (a few
    hundred MB of code in a typical ML environment: the scaling ladder's default corpus)."""
    root = sysconfig.get_paths()["stdlib"]
    roots = [root] + ([sysconfig.get_paths()["purelib"]] if site_packages else [])
    files = []
    for top in roots:
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames[:] = sorted(
                d
                for d in dirnames
                if d not in ("site-packages", "test", "tests", "__pycache__", "idlelib")
            )
            files += [
                (os.path.join(dirpath, f), top) for f in sorted(filenames) if f.endswith(".py")
            ]
    written = docs = 0
    with open(out_path, "w", encoding="utf-8") as out:
        for path, top in files:
            try:
                with open(path, encoding="utf-8") as f:
                    text = f.read()
            except (UnicodeDecodeError, OSError):
                continue
            if not text.strip() or len(text) > max_file_bytes:
                continue
            line = json.dumps({"text": text, "source": os.path.relpath(path, top)})
            out.write(line + "\n")
            written += len(line) + 1
            docs += 1
            if written >= max_bytes:
                break
    if docs == 0:
        raise RuntimeError(f"no Python sources found under {root}")
    return {"documents": docs, "bytes": written, "root": root}


def tokenize_corpus(jsonl: str, output_prefix: str, tokenizer_model: str, max_workers: int):
    """The corpus as megatron's indexed dataset (sentencepiece, EOD after each file), with our
    preprocessing; returns its PreprocessSummary (``outputs[0]`` is the data prefix)."""
    from megatron_hybrid.data.preprocess import preprocess

    return preprocess(
        [jsonl],
        output_prefix,
        "SentencePieceTokenizer",
        tokenizer_model,
        workers=max(1, min(max_workers, os.cpu_count() or 1)),
        append_eod=True,
        progress=False,
    )
