"""RMSNorm variants used by Olmo Hybrid (all ``x * rsqrt(mean(x^2) + eps) * w`` in fp32).

- ``RMSNorm``: the block norms. Torch-only; tags its weight ``sequence_parallel`` so that
  megatron-core's grad finalisation all-reduces it across TP when activations are sequence-split
  (megatron's own torch norm refuses sequence parallelism).
- ``TPFullWidthRMSNorm``: Olmo's QK-norm, taken over the *full* projection width although each
  TP rank holds only its heads' slice: the sum of squares is all-reduced across TP, and the
  weight is sharded like the heads. Computed by ``kernels/rmsnorm.py`` (Triton on CUDA and under
  TRITON_INTERPRET=1: keeps only the input, weight and an fp32 rstd per row; else the eager
  torch ops, unchanged).
"""

from __future__ import annotations

import torch
from torch import nn

from megatron_hybrid import mcore
from megatron_hybrid.kernels.rmsnorm import tp_rmsnorm
from megatron_hybrid.parallel.collectives import all_reduce_sum


class RMSNorm(nn.Module):
    """Block RMSNorm; signature matches megatron's norm builders ``(config, hidden_size, eps)``."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-6, **_unused):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        # With sequence parallelism every TP rank sees a different slice of tokens, so the
        # weight's gradient is partial and must be summed over TP (megatron does this for params
        # carrying this flag).
        self.weight.sequence_parallel = bool(config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        # Same cast order as HF/OLMo-core: weight (param dtype) times fp32, then to input dtype.
        return (self.weight * y).to(x.dtype)


class TPFullWidthRMSNorm(nn.Module):
    """RMSNorm over a width split across TP ranks (contiguously, by heads).

    ``full_width`` is the unsplit width; this rank holds ``full_width // tp`` of it.
    """

    def __init__(self, config, full_width: int, eps: float, tp_group):
        super().__init__()
        tp = tp_group.size() if tp_group is not None else 1
        assert full_width % tp == 0
        self.eps = eps
        self.full_width = full_width
        self.tp_group = tp_group
        self.weight = nn.Parameter(torch.ones(full_width // tp, dtype=config.params_dtype))
        mcore.set_tensor_model_parallel_attributes(self.weight, True, 0, 1)

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        # differentiable (the torch path runs autograd through it); identity on one rank
        return all_reduce_sum(t, self.tp_group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return tp_rmsnorm(x, self.weight, self.eps, self.full_width, self._all_reduce)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        return mcore.make_sharded_tensors_for_checkpoint(
            self.state_dict(prefix="", keep_vars=True), prefix, {"weight": 0}, sharded_offsets
        )
