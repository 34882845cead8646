"""``python -m tests.parallel.fuzz_train <trainer flags> [--then <trainer flags> ...]``: the real
trainer (``megatron_hybrid.train``) with ``--mock-data`` rows replaced by the fuzzed document
layouts of ``tests/parallel/document_fuzz.py`` (seeded by ``--seed``), several runs in one
launch as tests/parallel/train_runs.py does. Used by test_cp_fuzz.py."""

from __future__ import annotations

import sys

from megatron_hybrid.data import batches
from tests.parallel import train_runs
from tests.parallel.document_fuzz import FuzzDocumentsDataset

if __name__ == "__main__":
    batches.MockDataset = FuzzDocumentsDataset  # what build_datasets makes for --mock-data
    sys.exit(train_runs.main(sys.argv[1:]))
