"""megatron_hybrid: Megatron-style 3D-parallel pretraining for hybrid GDN/attention language models.

Tiers (dependencies flow downward only):
    tools/*.py                          thin command-line wrappers
    megatron_hybrid.models.olmo_hybrid  config + presets, layer specs, model builder, HF mapping
    megatron_hybrid.layers              GDN mixer, Olmo attention, norms, MLP layer
    megatron_hybrid.parallel            process groups, CPU shim, TP collectives
    megatron_hybrid.kernels             GDN ops (pure-PyTorch reference now, Triton later)
"""

__version__ = "0.1.0"
