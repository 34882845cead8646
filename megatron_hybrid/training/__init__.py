"""Training: typed run config, CLI parsing, the loop, checkpoints, metrics."""
