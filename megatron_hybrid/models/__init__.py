"""Model families. One folder per model: config + presets, specs, model builder, HF mapping."""
