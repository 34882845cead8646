"""The GDN kernels' default settings (and the layer's conv1d, gated-norm, SwiGLU and QK-norm
kernels) compile for Hopper (sm_90) without register spills.

A spill or a register count past 255 is a performance regression that no CPU test of results
can see (the interpreter has no registers), and the GPU is not always at hand: this compiles
every kernel one fwd+bwd launches, with the host code's real block sizes, for sm_90 on the CPU
(tools/kernel_resources.py) and reads the cubins. K > 128 is left out: its two-product reverse
kernel spills by design (see docs/kernels.md).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[2]

SHAPES = {"olmo_30h_k96_v192": "4,8192,30,96,192", "32h_k128_v128": "1,8192,32,128,128"}
EXPECTED = {  # K = 96 splits the bwd chunk work in three kernels, K = 128 keeps it fused
    "olmo_30h_k96_v192": {"_bwd_local_kernel", "_bwd_kblock_kernel", "_bwd_finish_kernel"}
    | {"_conv4_fwd_kernel", "_conv4_bwd_kernel"}  # conv1d and norm at Olmo Hybrid 7B widths
    | {"_gated_rmsnorm_fwd_kernel", "_gated_rmsnorm_bwd_kernel"}
    | {"_swiglu_fwd_kernel", "_swiglu_bwd_kernel"}  # the MLP and QK-norm kernels at 7B widths
    | {"_row_reduce_kernel", "_norm_fwd_kernel", "_norm_bwd_kernel"},
    "32h_k128_v128": {"_bwd_chunk_kernel"},
}
COMMON = {
    "_l2norm_fwd_kernel", "_fwd_prep_kernel", "_fwd_state_kernel", "_fwd_output_kernel",
    "_bwd_rhs_kernel", "_bwd_chain_kernel", "_l2norm_bwd_kernel",
}  # fmt: skip


@pytest.mark.parametrize("name", list(SHAPES))
def test_default_kernels_compile_for_sm90_without_spills(name, tmp_path):
    shape = SHAPES[name]
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "GDN_TRITON_CFG")}
    out = tmp_path / "res.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "kernel_resources.py"), "--shape", shape,
         "--json", str(out)]
        + (["--conv-norm", "11520,192", "--mlp-qknorm", "11008,3840"] if name.startswith("olmo")
           else []),
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert {r["kernel"] for r in rows} == COMMON | EXPECTED[name], proc.stdout
    for r in rows:
        assert 0 < r["reg"] <= 255, r
        assert r["spill"] == 0, f"{r['kernel']} spills {r['spill']} bytes:\n{proc.stdout}"
        assert r["programs_per_sm"] >= 1, r
