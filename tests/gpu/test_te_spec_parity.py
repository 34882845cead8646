"""GPU: the Transformer Engine layer spec matches transformers' olmo_hybrid (HF runs on CPU)."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import run_python

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("spec", ["te", "local"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_spec_parity_on_gpu(make_hf_config, spec, dtype):
    cfg = make_hf_config("gpu")
    args = ["tools/compare_hf.py", "--hf-config", str(cfg), "--spec", spec, "--dtype", dtype]
    if dtype == "fp32":
        args.append("--grads")
    proc = run_python(args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().splitlines()[-1].startswith("PARITY OK"), proc.stdout
