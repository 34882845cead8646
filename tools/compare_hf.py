#!/usr/bin/env python
"""Compare our megatron-core Olmo-Hybrid with transformers' olmo_hybrid (logits, optional grads).

    python tools/compare_hf.py --hf-config cfg.json [--tp 1] [--seq-len 64] [--dtype fp32]
    torchrun --nproc-per-node 2 tools/compare_hf.py --hf-config cfg.json --tp 2 --grads

The last line starts with PARITY OK or PARITY FAIL; exit status 0 iff OK.
"""

import sys

from megatron_hybrid.conversion.hf_compare import main

if __name__ == "__main__":
    sys.exit(main())
