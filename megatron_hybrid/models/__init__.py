"""Model families. One folder per model: config + presets, specs, model builder, HF mapping (names
and shapes only: no file I/O, no imports from training/, inference/ or conversion/)."""
