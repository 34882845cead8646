"""Tokenizers, corpus preprocessing into megatron indexed datasets, and training batches."""
