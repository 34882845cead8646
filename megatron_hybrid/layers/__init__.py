"""Layers of the hybrid model: GDN mixer, Olmo attention, norms and the MLP sub-layer."""
