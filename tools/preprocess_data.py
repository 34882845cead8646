#!/usr/bin/env python
"""jsonl -> megatron indexed dataset (Megatron-LM's tools/preprocess_data.py interface).

    python tools/preprocess_data.py --input 'data/*.jsonl' --json-keys text \\
        --output-prefix data/corpus --tokenizer-type SentencePieceTokenizer \\
        --tokenizer-model tok.model --workers 8 --append-eod
writes data/corpus_text_document.bin/.idx (pass data/corpus_text_document to --data-path).
"""

import argparse
import sys

from megatron_hybrid.data.preprocess import CorpusError, preprocess
from megatron_hybrid.data.tokenizers import TOKENIZER_TYPES


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", nargs="+", required=True, help="jsonl file(s) or glob(s)")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="keys to tokenize")
    p.add_argument("--output-prefix", required=True)
    p.add_argument("--tokenizer-type", required=True, choices=sorted(TOKENIZER_TYPES))
    p.add_argument("--tokenizer-model", required=True)
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (use ~#cores)")
    p.add_argument("--append-eod", action="store_true", help="end every document with EOD")
    p.add_argument("--strict", action="store_true", help="stop at the first bad line")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    try:
        summary = preprocess(
            a.input,
            a.output_prefix,
            a.tokenizer_type,
            a.tokenizer_model,
            a.json_keys,
            a.workers,
            a.append_eod,
            a.strict,
            progress=not a.no_progress,
        )
    except (CorpusError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # preprocess() has removed its partial outputs
        print("error: interrupted; no output written", file=sys.stderr)
        return 130
    print(summary.report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
