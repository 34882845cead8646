"""Slice a full (unsharded) tensor into this TP rank's piece, using the attributes megatron-core
puts on each parameter (``tensor_model_parallel``, ``partition_dim``). SwiGLU's fused fc1 is the
one layout that is not a plain contiguous split: ``[gate; up]`` -> ``[gate_r; up_r]``."""

from __future__ import annotations

import torch


def is_glu_fc1(name: str) -> bool:
    return name.endswith("mlp.linear_fc1.weight")


def shard_tensor(name: str, full: torch.Tensor, param, tp_rank: int, tp_size: int) -> torch.Tensor:
    if not getattr(param, "tensor_model_parallel", False) or tp_size == 1:
        return full
    if is_glu_fc1(name):
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp_size, 0)[tp_rank], up.chunk(tp_size, 0)[tp_rank]])
    return full.chunk(tp_size, dim=param.partition_dim)[tp_rank]


def unshard_tensor(name: str, parts: list[torch.Tensor], param) -> torch.Tensor:
    if not getattr(param, "tensor_model_parallel", False) or len(parts) == 1:
        return parts[0]
    if is_glu_fc1(name):
        gates, ups = zip(*(p.chunk(2, 0) for p in parts))
        return torch.cat([*gates, *ups])
    return torch.cat(parts, dim=param.partition_dim)


def full_shape(name: str, param, tp_size: int) -> tuple[int, ...]:
    shape = list(param.shape)
    if getattr(param, "tensor_model_parallel", False) and tp_size > 1:
        shape[param.partition_dim] *= tp_size
    return tuple(shape)
