"""Run under torchrun (gloo): the GDN mixer and the core attention with context parallelism
vs the same layers on the whole packed row, on one rank. Used by tests/parallel/test_layouts.py.

Every rank builds the same layer (same seed) and the same random row; the 1-rank reference runs
the whole row, the CP run this rank's zigzag share. Checked: outputs at this rank's tokens, the
gradients of the layer input (and attention q/k/v) at those tokens, and every parameter
gradient summed over the CP ranks; also megatron's RoPE slicing against the zigzag positions.
Prints ``CP CHECK OK <cp size>`` when all pass.
"""

from __future__ import annotations

import math
import sys

import torch
import torch.distributed as dist

from megatron_hybrid import mcore
from megatron_hybrid.data.batches import packed_seq_params
from megatron_hybrid.layers.attention import TorchCausalAttention
from megatron_hybrid.layers.gdn import GDNSubmodules, OlmoGatedDeltaNet
from megatron_hybrid.models.olmo_hybrid.presets import tiny
from megatron_hybrid.models.olmo_hybrid.specs import gdn_shape
from megatron_hybrid.parallel import context, state

N = 96  # row length: CP 2 -> chunks of 24, CP 4 -> chunks of 12
# Document starts chosen against the chunk grids of CP 2 (0, 24, 48, 72) and CP 4 (0, 12, ...):
# 12 and 48 start exactly at a chunk; 17, 18 give a one-token document; CP2 chunk 1 and CP4
# chunks 2, 3, 5 are one document continuing from earlier chunks (nonzero A); 83 starts a
# document inside the conv halo of CP4 chunk 7 (84); 90 inside a continuing chunk.
LAYOUTS = {
    "documents": [0, 12, 17, 18, 48, 83, 90, N],
    "one document": [0, N],
}
TOL_OUT, TOL_GRAD = 2e-5, 1e-4


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check(name: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    err = rel(got, want)
    if not err <= tol:
        print(f"rank {dist.get_rank()}: {name}: relative error {err:.3e} > {tol:g}", flush=True)
        sys.exit(1)


def build_gdn(cfg, tcfg):
    sub = GDNSubmodules(
        in_proj=mcore.ColumnParallelLinear,
        ab_proj=mcore.ColumnParallelLinear,
        out_proj=mcore.RowParallelLinear,
    )
    layer = OlmoGatedDeltaNet(tcfg, sub, gdn=gdn_shape(cfg), pg_collection=state.process_groups())
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name == "A_log":  # slow decay: the state carries across many chunks
                p.copy_(torch.empty(p.shape).uniform_(0.01, 0.1, generator=gen).log())
            elif name == "dt_bias":
                p.fill_(-2.0)
            elif name == "out_norm_weight":
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return layer


def gdn_case(layer, cu: list[int], group, seed: int) -> None:
    c, r = dist.get_world_size(group), dist.get_rank(group)
    D = layer.config.hidden_size
    gen = torch.Generator().manual_seed(seed)
    x_N1D = torch.randn(N, 1, D, generator=gen)
    dy_N1D = torch.randn(N, 1, D, generator=gen)
    cu_t = torch.tensor(cu, dtype=torch.int32)

    ref_x = x_N1D.clone().requires_grad_(True)
    layer.zero_grad()
    ref_y, _ = layer(ref_x, packed_seq_params=packed_seq_params(cu_t, N))
    (ref_y * dy_N1D).sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in layer.named_parameters()}

    def share(t_N1D):  # this rank's tokens, [N/c, 1, D]
        return context.split_for_rank(t_N1D.transpose(0, 1), r, c).transpose(0, 1)

    x = share(x_N1D).clone().requires_grad_(True)
    layer.zero_grad()
    y, _ = layer(x, packed_seq_params=context.context_parallel_params(cu_t, N, group))
    (y * share(dy_N1D)).sum().backward()
    check(f"GDN output {cu}", y, share(ref_y.detach()), TOL_OUT)
    check(f"GDN input grad {cu}", x.grad, share(ref_x.grad), TOL_GRAD)
    for n, p in layer.named_parameters():
        g = p.grad.clone()
        dist.all_reduce(g, group=group)
        check(f"GDN grad {n} {cu}", g, ref_grads[n], TOL_GRAD)


def attention_case(cu: list[int], group, seed: int) -> None:
    c, r = dist.get_world_size(group), dist.get_rank(group)
    gen = torch.Generator().manual_seed(seed)
    n_heads, groups, d = 4, 2, 8
    q, dq = (torch.randn(N, 1, n_heads, d, generator=gen) for _ in range(2))
    k, v = (torch.randn(N, 1, groups, d, generator=gen) for _ in range(2))
    cu_t = torch.tensor(cu, dtype=torch.int32)
    attn = TorchCausalAttention(None, softmax_scale=1 / math.sqrt(d))

    ref = [t.clone().requires_grad_(True) for t in (q, k, v)]
    ref_o = attn(*ref, packed_seq_params=packed_seq_params(cu_t, N))
    (ref_o * dq.reshape(N, 1, -1)).sum().backward()

    def share(t):
        return context.split_for_rank(t.transpose(0, 1), r, c).transpose(0, 1)

    loc = [share(t).clone().requires_grad_(True) for t in (q, k, v)]
    o = attn(*loc, packed_seq_params=context.context_parallel_params(cu_t, N, group))
    (o * share(dq).reshape(N // c, 1, -1)).sum().backward()
    check(f"attention output {cu}", o, share(ref_o.detach()), TOL_OUT)
    for name, a, b in zip("qkv", loc, ref):
        check(f"attention d{name} {cu}", a.grad, share(b.grad), TOL_GRAD)


def rope_case(group) -> None:
    """megatron's RotaryEmbedding, given the global row length, slices exactly the positions of
    this rank's zigzag tokens (the model relies on it instead of passing positions)."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    rope = RotaryEmbedding(16, 1.0, rotary_base=10000, use_cpu_initialization=True, cp_group=group)
    params = context.context_parallel_params(torch.tensor([0, N], dtype=torch.int32), N, group)
    emb = rope(params.max_seqlen_q, packed_seq=False)  # [N/c, 1, 1, 16], what HybridModel does
    want = rope.get_emb(N)[params.positions]
    if not torch.equal(emb, want):
        print(f"rank {dist.get_rank()}: RoPE positions differ from the zigzag layout", flush=True)
        sys.exit(1)


def main() -> None:
    torch.use_deterministic_algorithms(True)
    world = int(__import__("os").environ["WORLD_SIZE"])
    state.initialize(state.ParallelLayout(context=world))
    group = mcore.parallel_state.get_context_parallel_group()
    cfg = tiny()
    layer = build_gdn(cfg, cfg.transformer_config(context_parallel=world))
    rope_case(group)
    for i, cu in enumerate(LAYOUTS.values()):
        gdn_case(layer, cu, group, seed=10 + i)
        attention_case(cu, group, seed=20 + i)
    dist.barrier()
    if dist.get_rank() == 0:
        print(f"CP CHECK OK {world}", flush=True)
    state.destroy()


if __name__ == "__main__":
    main()
