"""Activation recompute on the GPU with the ``te`` spec (Transformer Engine norms, linears and
attention; our Triton GDN kernels), fp32: every setting of tests/training/recompute_check.py
gives the loss and gradients of the run without recompute, and the recomputed parts run twice.

Not yet run on a GPU: no device machine came up in the session that wrote it (2026-12-05); the
CPU equivalents (tests/training/test_recompute.py) pass. Tolerances are set for fp32 TE kernels
that may sum in another order; tighten them once seen."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_python

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def rows():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    args = ["-m", "tests.training.recompute_check", "--flavour", "te", "--backend", "triton"]
    proc = run_python(args, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return {r["name"]: r for r in out}


NAMES = [
    "full_uniform_1",
    "full_uniform_2",
    "full_block_1",
    "selective_core_attn",
    "selective_gdn",
    "selective_mlp",
    "selective_layernorm",
    "selective_all",
]


@pytest.mark.parametrize("name", NAMES)
def test_te_spec_same_loss_and_gradients(rows, name):
    r, base = rows[name], rows["none"]
    assert r["loss"] == pytest.approx(r["ref_loss"], rel=1e-6, abs=0), r
    assert r["max_grad_diff"] <= 1e-5 * r["grad_scale"], r
    assert r["saved_bytes"] < base["saved_bytes"], (r, base)
    assert sum(r["calls"].values()) > sum(base["calls"].values()), (r, base)
