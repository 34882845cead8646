"""tools/compare_hf.py against transformers' olmo_hybrid: logits and every gradient, TP 1 and 2."""

from __future__ import annotations

import pytest

from tests.conftest import run_python

# Variants of the tiny HF config: each exercises one axis of what transformers accepts.
VARIANTS = {
    "rope": {},
    "nope": {"rope_parameters": {"rope_type": "default", "rope_theta": None}},
    "beta_lt_1": {"linear_allow_neg_eigval": False},
    "gqa": {"num_key_value_heads": 2},
    "odd_heads_dk_ne_dv": {
        "hidden_size": 60,
        "num_attention_heads": 5,
        "num_key_value_heads": 5,
        "linear_num_key_heads": 3,
        "linear_num_value_heads": 3,
        "linear_key_head_dim": 12,
        "linear_value_head_dim": 20,
        "vocab_size": 301,
    },
    "attention_first_order": {
        "layer_types": ["full_attention", "linear_attention", "full_attention", "linear_attention"],
    },
}


def _last_line(proc):
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_parity_tp1(make_hf_config, variant):
    cfg = make_hf_config(variant, **VARIANTS[variant])
    proc = run_python(
        ["tools/compare_hf.py", "--hf-config", str(cfg), "--grads", "--seq-len", "70"]
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _last_line(proc).startswith("PARITY OK"), proc.stdout


@pytest.mark.parametrize(
    "variant,extra",
    [
        ("rope", ["--sequence-parallel"]),
        ("nope", []),
        ("gqa", ["--sequence-parallel"]),
        ("beta_lt_1", []),
    ],
)
def test_parity_tp2_logits_and_grads(make_hf_config, variant, extra):
    """TP=2 (+SP) logits equal HF's, and every parameter's gradient equals HF's (hence TP=1's)."""
    cfg = make_hf_config(variant, **VARIANTS[variant])
    proc = run_python(
        ["tools/compare_hf.py", "--hf-config", str(cfg), "--tp", "2", "--grads", *extra], nproc=2
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _last_line(proc).startswith("PARITY OK"), proc.stdout


def test_parity_fails_when_weights_differ(make_hf_config, monkeypatch):
    """The check can fail: a deliberately broken mapping (swapped a/b projections) is caught."""
    cfg = make_hf_config("broken")
    code = (
        "import sys\n"
        "import megatron_hybrid.conversion.hf_compare as hc\n"
        "orig = hc.hf_to_megatron\n"
        "def broken(sd, cfg):\n"
        "    out = orig(sd, cfg)\n"
        "    k = 'decoder.layers.0.self_attention.ab_proj.weight'\n"
        "    w = out[k].view(-1, 2, out[k].shape[-1])\n"
        "    out[k] = w.flip(1).reshape(out[k].shape)\n"
        "    return out\n"
        "hc.hf_to_megatron = broken\n"
        f"sys.exit(hc.main(['--hf-config', '{cfg}']))\n"
    )
    proc = run_python(["-c", code])
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert _last_line(proc).startswith("PARITY FAIL"), proc.stdout


def test_bf16_parity(make_hf_config):
    cfg = make_hf_config("bf16")
    proc = run_python(["tools/compare_hf.py", "--hf-config", str(cfg), "--dtype", "bf16"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _last_line(proc).startswith("PARITY OK"), proc.stdout
