"""Process groups, TP collectives with the autograd we need, and the CPU shim for megatron-core."""
