"""HF <-> megatron weight mapping: bitwise round trip; every tensor mapped exactly once."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_hybrid.models.olmo_hybrid.hf_mapping import (
    config_from_hf,
    hf_to_megatron,
    megatron_to_hf,
    split_fused_conv,
)
from tests.conftest import TINY_HF_CONFIG


def _hf_state(changes=None):
    from transformers import OlmoHybridConfig as HFConfig
    from transformers import OlmoHybridForCausalLM

    raw = json.loads(TINY_HF_CONFIG.read_text())
    raw.update(changes or {})
    torch.manual_seed(0)
    model = OlmoHybridForCausalLM(HFConfig(**{k: v for k, v in raw.items() if k != "model_type"}))
    cfg = config_from_hf(raw)
    return split_fused_conv(model.state_dict(), cfg), cfg


@pytest.mark.parametrize("changes", [None, {"num_key_value_heads": 3}], ids=["mha", "gqa"])
def test_round_trip_is_bitwise(changes):
    hf_sd, cfg = _hf_state(changes)
    back = megatron_to_hf(hf_to_megatron(hf_sd, cfg), cfg)
    assert sorted(back) == sorted(hf_sd)
    for k in hf_sd:
        assert torch.equal(back[k], hf_sd[k]), k


def test_released_key_names():
    hf_sd, cfg = _hf_state()
    assert "model.layers.0.linear_attn.q_conv1d.weight" in hf_sd
    assert hf_sd["model.layers.0.linear_attn.q_conv1d.weight"].shape == (6 * 16, 1, 4)
    assert "model.layers.3.self_attn.q_norm.weight" in hf_sd


def test_missing_unexpected_and_misshaped_keys_are_named():
    hf_sd, cfg = _hf_state()
    sd = dict(hf_sd)
    del sd["model.layers.1.linear_attn.b_proj.weight"]
    with pytest.raises(KeyError, match="missing tensor 'model.layers.1.linear_attn.b_proj.weight'"):
        hf_to_megatron(sd, cfg)
    sd = dict(hf_sd, **{"model.layers.9.extra.weight": torch.zeros(1)})
    with pytest.raises(KeyError, match="unexpected HF tensor.*model.layers.9.extra.weight"):
        hf_to_megatron(sd, cfg)
    sd = dict(hf_sd)
    sd["model.layers.3.self_attn.k_norm.weight"] = torch.zeros(5)
    with pytest.raises(ValueError, match="k_norm.weight' has shape \\(5,\\), expected \\(96,\\)"):
        hf_to_megatron(sd, cfg)


def test_padded_vocab_is_truncated_on_export():
    hf_sd, _ = _hf_state()
    raw = json.loads(TINY_HF_CONFIG.read_text())
    cfg = config_from_hf(dict(raw, vocab_size=500), vocab_multiple=128)
    assert cfg.vocab_size == 512
    sd = {
        k: (v[:500] if k in ("model.embed_tokens.weight", "lm_head.weight") else v)
        for k, v in hf_sd.items()
    }
    ours = hf_to_megatron(sd, cfg)
    assert ours["embedding.word_embeddings.weight"].shape[0] == 512
    assert torch.all(ours["output_layer.weight"][500:] == 0)
    back = megatron_to_hf(ours, cfg, hf_vocab_size=500)
    assert torch.equal(back["lm_head.weight"], sd["lm_head.weight"])
