"""Olmo-Hybrid initialisation that gives the same model at every parallel layout.

Each parameter is drawn *in full* from a generator seeded by (seed, its global name) — global
layer numbers, not a pipeline stage's local ones — and this rank keeps its TP slice. So TP, PP,
VP, CP and DP runs start from bit-identical weights, which is what lets every layout reproduce
the 1-rank run. megatron-core's own init is switched off (``perform_initialization=False``).

Rules (the fact sheet): every linear, conv and embedding truncated normal std 0.02 (+-3 std);
A_log = log U(0, 16); dt log-uniform in [1e-3, 1e-1] clamped at 1e-4 and dt_bias =
softplus^-1(dt); norm weights 1.
"""

from __future__ import annotations

import hashlib
import math
import re

import torch

from megatron_hybrid import mcore
from megatron_hybrid.models.olmo_hybrid.config import OlmoHybridConfig
from megatron_hybrid.parallel.sharding import full_shape, shard_tensor


def _seed_for(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def init_full(
    name: str, shape, cfg: OlmoHybridConfig, gen: torch.Generator, device
) -> torch.Tensor:
    if name.endswith("A_log"):
        lo, hi = cfg.gdn_a_log_range
        return torch.empty(shape, device=device).uniform_(lo, hi, generator=gen).log()
    if name.endswith("dt_bias"):
        lo, hi = math.log(cfg.gdn_dt_range[0]), math.log(cfg.gdn_dt_range[1])
        u = torch.rand(shape, device=device, generator=gen)
        dt = torch.exp(u * (hi - lo) + lo).clamp(min=cfg.gdn_dt_init_floor)
        return dt + torch.log(-torch.expm1(-dt))
    if len(shape) == 1:  # norm weights (block, QK, final, GDN output norm)
        return torch.ones(shape, device=device)
    std = cfg.init_std
    t = torch.empty(shape, device=device)
    return torch.nn.init.trunc_normal_(t, 0.0, std, -3 * std, 3 * std, generator=gen)


def global_param_names(model) -> dict[str, str]:
    """Local parameter name -> name with global layer numbers (decoder.layers.{global}...)."""
    out = {}
    layers = model.decoder.layers if hasattr(model, "decoder") else []
    for name, _ in model.named_parameters():
        m = re.match(r"(.*decoder\.layers\.)(\d+)(\..*)", name)
        if m:
            global_idx = layers[int(m.group(2))].layer_number - 1
            out[name] = f"{m.group(1)}{global_idx}{m.group(3)}"
        else:
            out[name] = name
    return out


@torch.no_grad()
def initialize_weights(model, cfg: OlmoHybridConfig, seed: int) -> None:
    ps = mcore.parallel_state
    tp_rank, tp_size = (
        ps.get_tensor_model_parallel_rank(),
        ps.get_tensor_model_parallel_world_size(),
    )
    names = global_param_names(model)
    for name, param in model.named_parameters():
        gname = names[name]
        device = param.device
        gen = torch.Generator(device=device).manual_seed(_seed_for(seed, gname))
        full = init_full(gname, full_shape(name, param, tp_size), cfg, gen, device)
        value = shard_tensor(name, full, param, tp_rank, tp_size)
        param.copy_(value.to(param.dtype))
        hp = getattr(param, "_high_precision_init_val", None)
        if hp is not None:
            # FP8 parameters (--fp8-param-gather): TE kept the value from before quantisation,
            # captured at construction (before this init), and megatron's distributed optimizer
            # seeds the fp32 master weights from it: give it this init instead.
            param._high_precision_init_val = value.to(device=hp.device, dtype=hp.dtype)
