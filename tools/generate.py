#!/usr/bin/env python
"""Generate from (or evaluate perplexity of) a megatron-hybrid checkpoint with recurrent state.

    python tools/generate.py --load runs/demo/ckpt --prompt "import os" --max-new-tokens 32
    python tools/generate.py --load CKPT --prompt-ids 5,9,14 --greedy --max-new-tokens 16
    python tools/generate.py --load CKPT --eval-file heldout.jsonl

See docs/generation.md.
"""

import sys

from megatron_hybrid.inference.cli import main

if __name__ == "__main__":
    sys.exit(main())
