"""Olmo Hybrid: config + presets, layer specs, model builder, init, and the pure name/shape mapping
to Hugging Face keys (hf_mapping.py; reading and writing HF files is megatron_hybrid.conversion's)."""
