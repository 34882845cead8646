#!/usr/bin/env python
"""Export a megatron-hybrid checkpoint (any TP/PP/VP layout) to a transformers olmo_hybrid dir.

    python tools/convert_to_hf.py --load runs/demo/ckpt --save runs/demo/hf \
        --tokenizer-model runs/demo/tokenizer.model [--iteration N] [--dtype auto|bf16|fp32] \
        [--hf-vocab-size N|tokenizer] [--skip-validation]

Runs in one process on CPU. The export is loaded back with AutoModelForCausalLM (fp32) and its
logits compared with ours; the last line starts with VALIDATION OK (exit 0) or VALIDATION FAIL
(exit 1); bad input is one `error: ...` line (exit 2). See docs/conversion.md.
"""

import sys

from megatron_hybrid.conversion.cli import main_to_hf

if __name__ == "__main__":
    sys.exit(main_to_hf())
