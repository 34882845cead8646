"""Gated DeltaNet (GDN) kernels: the dispatching entry point and its reference implementations.

The Triton implementations live in :mod:`.triton_chunk` (chunked forward + backward; device code
in :mod:`.chunk_kernels`) and
:mod:`.triton_step` (single-token decode); they import triton lazily through the functions below.
"""

from .api import chunk_gated_delta_rule
from .naive import l2norm, naive_recurrent_gated_delta_rule


def fused_recurrent_gated_delta_rule_step(*args, **kwargs):
    """One decode step on our Triton kernel; see :mod:`.triton_step`."""
    from .triton_step import fused_recurrent_gated_delta_rule_step as step

    return step(*args, **kwargs)


__all__ = [
    "chunk_gated_delta_rule",
    "fused_recurrent_gated_delta_rule_step",
    "l2norm",
    "naive_recurrent_gated_delta_rule",
]
