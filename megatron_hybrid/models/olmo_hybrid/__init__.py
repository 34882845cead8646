"""Olmo Hybrid: config + presets, layer specs, model builder, init, HF mapping and parity."""
