"""Presets, parameter counts (checked against transformers' own model) and pattern handling."""

from __future__ import annotations

import pytest
import torch

from megatron_hybrid.models.olmo_hybrid.config import ConfigError, OlmoHybridConfig
from megatron_hybrid.models.olmo_hybrid.hf_mapping import config_from_hf, hf_config_dict
from megatron_hybrid.models.olmo_hybrid.presets import PRESETS, get_preset

RELEASED_7B_PARAMS = 7_430_870_688


def _hf_param_count(cfg: OlmoHybridConfig) -> int:
    from transformers import OlmoHybridConfig as HFConfig
    from transformers import OlmoHybridForCausalLM

    fields = {
        k: v for k, v in hf_config_dict(cfg).items() if k not in ("architectures", "model_type")
    }
    with torch.device("meta"):
        model = OlmoHybridForCausalLM(HFConfig(**fields))
    return sum(p.numel() for p in model.parameters())


def test_7b_preset_is_the_released_model():
    cfg = get_preset("olmo_hybrid_7b")
    assert cfg.num_params() == RELEASED_7B_PARAMS
    assert cfg.layer_pattern() == "G-G-G-*-" * 8
    assert cfg.rope_theta is None and cfg.vocab_size == 100352
    assert _hf_param_count(cfg) == RELEASED_7B_PARAMS


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_param_count_matches_transformers(name):
    cfg = get_preset(name)
    assert cfg.num_params() == _hf_param_count(cfg)


def test_tiny_preset_shape():
    cfg = get_preset("tiny")
    assert cfg.layer_pattern() == "G-G-G-*-" * 2
    assert cfg.gdn_num_heads == 6 and cfg.num_attention_heads == 6
    assert cfg.gdn_head_k_dim != cfg.gdn_head_v_dim
    assert 2e5 < cfg.num_params() < 5e6
    with pytest.raises(
        ConfigError, match="num_attention_heads=6 is not divisible by tensor parallel size 4"
    ):
        cfg.check_parallel(4)


def test_hf_config_round_trip():
    for name in PRESETS:
        cfg = get_preset(name)
        back = config_from_hf(hf_config_dict(cfg))
        assert back.to_dict() == cfg.replace(init_std=back.init_std).to_dict()


def test_pattern_parsing_and_pipeline_splits():
    cfg = get_preset("tiny")
    assert cfg.layer_pattern(2) == "G-G-G-*-|G-G-G-*-"
    assert cfg.layer_pattern(4) == "G-G-|G-*-|G-G-|G-*-"
    with pytest.raises(ConfigError, match="8 blocks cannot be split evenly into 3"):
        cfg.layer_pattern(3)
    assert OlmoHybridConfig.block_types_from_pattern("G-*-|G-") == ("gdn", "attention", "gdn")
    with pytest.raises(ConfigError, match="'G-' .* or '\\*-'"):
        OlmoHybridConfig.block_types_from_pattern("GG--")


def test_invalid_fields_named():
    with pytest.raises(
        ConfigError, match="num_attention_heads=6 is not a multiple of num_key_value_heads=4"
    ):
        OlmoHybridConfig(num_attention_heads=6, num_key_value_heads=4, hidden_size=96)
    with pytest.raises(ConfigError, match="block_types has 3 entries but num_layers=4"):
        OlmoHybridConfig(num_layers=4, block_types=("gdn", "gdn", "attention"))
