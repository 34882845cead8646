"""Bad configs give one clear line naming the field and value, never a traceback."""

from __future__ import annotations

import pytest

from tests.conftest import run_python

CASES = {
    "unsupported_act": ({"hidden_act": "gelu"}, [], "hidden_act='gelu'"),
    "sliding_window": ({"sliding_window": 128}, [], "sliding_window=128"),
    "uneven_linear_heads": ({"linear_num_value_heads": 3}, [], "linear_num_value_heads=3"),
    "bad_layer_type": (
        {"layer_types": ["linear_attention", "mamba", "linear_attention", "full_attention"]},
        [],
        "layer_types='mamba'",
    ),
    "wrong_model_type": ({"model_type": "llama"}, [], "model_type='llama'"),
    "heads_vs_tp": (
        {"num_attention_heads": 5, "num_key_value_heads": 5, "hidden_size": 60},
        ["--tp", "2"],
        "num_attention_heads=5 is not divisible by tensor parallel size 2",
    ),
    "gdn_heads_vs_tp": (
        {"linear_num_key_heads": 3, "linear_num_value_heads": 3},
        ["--tp", "2"],
        "gdn_num_heads=3 is not divisible by tensor parallel size 2",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_one_line_error(make_hf_config, case):
    changes, extra, needle = CASES[case]
    cfg = make_hf_config(case, **changes)
    proc = run_python(["tools/compare_hf.py", "--hf-config", str(cfg), *extra])
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout.strip().splitlines()[-1].startswith("PARITY FAIL")
