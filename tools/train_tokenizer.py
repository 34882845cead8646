#!/usr/bin/env python
"""Train a sentencepiece BPE tokenizer from jsonl:  --input corpus.jsonl --model-prefix tok"""

import argparse
import sys

from megatron_hybrid.data.tokenizer_training import train_sentencepiece


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--input", nargs="+", required=True, help="jsonl file(s) or glob(s)")
    p.add_argument("--model-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--json-key", default="text")
    a = p.parse_args(argv)
    try:
        path = train_sentencepiece(a.input, a.model_prefix, a.vocab_size, a.json_key)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
