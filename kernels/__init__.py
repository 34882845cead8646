"""Compute kernels for Olmo Hybrid models (installed as ``megatron_hybrid.kernels``)."""
