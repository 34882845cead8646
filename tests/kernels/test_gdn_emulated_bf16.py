"""bf16 accuracy of the GDN kernels with the GPU's rounding, on the CPU.

The other CPU kernel tests check bf16 loosely: the stock Triton interpreter truncates float32 to
bfloat16, so its bf16 errors are 2-4x the GPU's and say little about the kernels' own rounding.
benchmarks/gdn_emulated_errors.py patches the interpreter (in its own process) to round like the
GPU; there it reproduces the H200's numbers within a few percent. The bounds below sit between
the current kernels (o 4.13-4.14e-3 at this shape) and fla 0.6's forward under the same
emulation (o 4.45-4.48e-3; the previous numerics, ``tinv_f32=0``, 4.44-4.48e-3): a change that
adds a 16-bit rounding to W, U, the state update or the output fails here before it reaches a GPU.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[2]

# relative L2 vs the float32 chunked reference on the same bf16 inputs; current values in brackets
BOUNDS = {
    "o": 4.3e-3,  # [4.13e-3, 4.14e-3]; fla 0.6: 4.45e-3, 4.48e-3
    "dq": 4.4e-3,  # [4.20e-3, 4.21e-3]
    "dk": 4.6e-3,  # [4.39e-3, 4.43e-3]
    "dv": 4.8e-3,  # [4.48e-3, 4.52e-3]
    "dg": 5.5e-3,  # [3.81e-3, 4.92e-3]
    "dbeta": 5.0e-3,  # [4.35e-3, 4.69e-3]
}


def test_bf16_errors_with_gpu_rounding(tmp_path):
    out = tmp_path / "errors.json"
    env = {k: v for k, v in os.environ.items() if k != "GDN_TRITON_CFG"}
    env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gdn_emulated_errors.py"),
         "--shape", "1,256,2,96,192", "--seeds", "1,2", "--grads", "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [r["impl"] for r in rows] == ["ours", "ours"], "fla must not be on the test path"
    for r in rows:
        for name, bound in BOUNDS.items():
            assert r["errors"][name] < bound, f"seed {r['seed']}: {name}\n{proc.stdout}"
