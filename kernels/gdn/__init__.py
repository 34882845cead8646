"""Gated DeltaNet (GDN) kernels: the dispatching entry point and its reference implementations."""

from .api import chunk_gated_delta_rule
from .naive import l2norm, naive_recurrent_gated_delta_rule

__all__ = ["chunk_gated_delta_rule", "l2norm", "naive_recurrent_gated_delta_rule"]
