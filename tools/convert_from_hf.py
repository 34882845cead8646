#!/usr/bin/env python
"""Import a transformers olmo_hybrid directory as a megatron-hybrid checkpoint (weights only).

    python tools/convert_from_hf.py --hf-model Olmo-Hybrid-7B --save runs/olmo7b \
        [--tensor-model-parallel-size N] [--pipeline-model-parallel-size M]
    megatron-hybrid-train --config runs/olmo7b/iter_0000000/run_config.json --load runs/olmo7b ...

Runs in one process on CPU; the dist checkpoint reshards to any TP/PP layout on load (the flags
only check that the model splits there). Bad input is one `error: ...` line (exit 2). See
docs/conversion.md.
"""

import sys

from megatron_hybrid.conversion.cli import main_from_hf

if __name__ == "__main__":
    sys.exit(main_from_hf())
