"""GPU: tools/generate.py decodes on the GPU with our Triton step/conv-update kernels (fp32)
and still equals transformers' generate (run on CPU), and its perplexity equals transformers'
loss. The CPU versions of these checks are tests/inference/test_generate.py.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import run_python
from tests.inference.test_generate import PROMPTS, _generated, _hf_model, _ok, hf_greedy

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("layout", [[], ["--tensor-model-parallel-size", "2"]])
def test_gpu_greedy_equals_transformers(tmp_path, layout):
    hf = _hf_model({"num_key_value_heads": 2})
    hf.save_pretrained(tmp_path / "hf")
    ckpt = str(tmp_path / "ckpt")
    _ok(run_python(["tools/convert_from_hf.py", "--hf-model", str(tmp_path / "hf"), "--save", ckpt,
                    *layout]))  # fmt: skip
    new = 32
    args = ["tools/generate.py", "--load", ckpt, "--device", "cuda", "--dtype", "fp32"]
    args += ["--greedy", "--ignore-eos", "--max-new-tokens", str(new)]
    for p in PROMPTS:
        args += ["--prompt-ids", p]
    proc = _ok(run_python(args))
    assert "(cuda, float32)" in proc.stdout
    for p, mine in zip(PROMPTS, _generated(proc.stdout)):
        assert mine == hf_greedy(hf, p, new), p
    # bf16 (the dtype checkpoints are trained in) decodes too; on random weights its greedy path
    # may leave fp32's at a near-tie (seen: the first token of one prompt), so it is reported
    bf16 = _ok(run_python([a if a != "fp32" else "bf16" for a in args]))
    assert "(cuda, bfloat16)" in bf16.stdout
    got = _generated(bf16.stdout)
    assert [len(g) for g in got] == [new] * len(PROMPTS)
    agree = [sum(x == y for x, y in zip(a, b)) / new for a, b in zip(got, _generated(proc.stdout))]
    print("bf16 vs fp32 greedy agreement per prompt:", agree)
