"""The GDN mixer's conv + recurrence under context parallelism, as ONE autograd node per layer.

Shapes and the state-passing algorithm are those of ``parallel/context.py``'s module doc (L
tokens per chunk, T = 2L on this rank, c CP ranks, h = W-1 conv halo rows, C conv channels).

**Why one node** (docs/parallelism.md, "Collective order"). The mixer communicates twice per
layer: the conv halo (last W-1 pre-conv rows of every chunk) and the per-chunk affine maps (A_j,
B_j). Both are all-gathers whose backward is a collective too. Built from ordinary autograd
ops, the graph *between* the two gathers depends on where documents start on this rank
(which chunks need A_j, whether any document is rerun from a passed-in state), and autograd
runs ready nodes in an order that follows the graph; so two CP ranks with different document
layouts ran the two backward all-reduces in opposite orders (gloo: size mismatch; NCCL: a hang
or, with equal sizes, silently summed wrong tensors). Here the whole mixer is one
``autograd.Function``: the gathers run in the forward with autograd off, the local work between
them is recorded as two *detached* sub-graphs, and the backward replays them stage by stage
with its two all-reduces at fixed points — always both, always in this order, a zero gradient
where a rank's data made a gathered value unused:

    forward:   tails -> all-gather #1 -> conv, zero-state pass, A_j -> all-gather #2 -> scan,
               rerun, splice -> o
    backward:  grad o -> stage-3 grads -> all-reduce #2 -> stage-2 grads -> all-reduce #1 -> inputs

The outer graph sees one node with fixed inputs (qkv, conv weight, g, beta), so the order of
*everything else* in the layer is data-independent as well.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from megatron_hybrid.kernels.conv import causal_conv1d
from megatron_hybrid.kernels.gdn import chunk_gated_delta_rule
from megatron_hybrid.kernels.gdn.transition import segment_transition
from megatron_hybrid.parallel.context import ContextParallelParams, global_chunk_order


def _gather(x: torch.Tensor, group) -> torch.Tensor:
    """Plain all-gather, no autograd: ``x [*] -> [c, *]`` (rank i's x at index i)."""
    x = x.detach().contiguous()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x, group=group)
    return torch.stack(parts)


def _leaf(x: torch.Tensor, track: bool) -> torch.Tensor:
    """A detached copy that starts a sub-graph (requires grad iff tracking and ``x`` did)."""
    return x.detach().requires_grad_(track and x.requires_grad) if track else x


# ---- the local stages -------------------------------------------------------------------------


def _conv_with_halo(x_1TC, weight_CW, tails_gchC, params: ContextParallelParams, activation):
    """Causal conv of this rank's two chunks, each extended on the left by the previous global
    chunk's last h pre-conv rows (zeros before chunk 0); global document starts are mapped into
    the extended chunks so the conv resets exactly where the 1-rank conv does. ``tails_gchC
    [2c, h, C]`` in global chunk order."""
    h, L = weight_CW.shape[-1] - 1, params.chunk_length
    _, T, C = x_1TC.shape
    starts = params.doc_starts()
    pieces, cu = [], [0]
    for local, j in enumerate(params.local_chunks):
        halo_hC = tails_gchC[j - 1] if j > 0 and h > 0 else x_1TC.new_zeros(h, C)
        pieces += [halo_hC, x_1TC[0, local * L : (local + 1) * L]]
        lo, base = j * L - h, cu[-1]  # global position of the halo's first row, its local index
        cu += [base + d - lo for d in starts if lo < d < (j + 1) * L]
        cu.append(base + h + L)
    xe_1EC = torch.cat(pieces, dim=0)[None]  # [1, 2(h+L), C]
    cu_t = torch.tensor(cu, dtype=torch.int32, device=x_1TC.device)
    ye_1EC = causal_conv1d(xe_1EC, weight_CW, cu_seqlens=cu_t, activation=activation)
    return torch.cat([ye_1EC[:, h : h + L], ye_1EC[:, 2 * h + L :]], dim=1)


def _chunk_segments(params: ContextParallelParams) -> list[tuple[list[int], bool]]:
    """Per local chunk: (local document starts in [0, L), continues_previous)."""
    L, out = params.chunk_length, []
    starts = params.doc_starts()
    for j in params.local_chunks:
        local = sorted({0} | {d - j * L for d in starts if j * L < d < (j + 1) * L})
        out.append((local, (j * L) not in starts))
    return out


def _zero_state_pass(q, k, v, g, beta, params, kw):
    """Every document's output from a zero initial state (documents reset at the global starts)
    and this rank's affine maps ``AB [2, H, K, K+V]`` (float32): A_j nonzero only for a chunk
    that is one continuing document, B_j the chunk's final state."""
    _, T, H, K = q.shape
    L, segs = params.chunk_length, _chunk_segments(params)
    cu = segs[0][0] + [L + s for s in segs[1][0]] + [T]
    o0, final_nhKV = chunk_gated_delta_rule(
        q, k, v, g, beta,
        cu_seqlens=torch.tensor(cu, dtype=torch.int32, device=q.device),
        output_final_state=True,
        **kw,
    )  # fmt: skip
    B_2hKV = torch.stack([final_nhKV[len(segs[0][0]) - 1], final_nhKV[-1]]).float()
    A = [q.new_zeros(H, K, K, dtype=torch.float32) for _ in range(2)]
    whole = [i for i, (starts, cont) in enumerate(segs) if cont and len(starts) == 1]
    if whole:
        A_whKK = segment_transition(
            torch.stack([k[0, i * L : (i + 1) * L] for i in whole]),  # [w, L, H, K]
            torch.stack([g[0, i * L : (i + 1) * L] for i in whole]),  # [w, L, H]
            torch.stack([beta[0, i * L : (i + 1) * L] for i in whole]),
            use_qk_l2norm_in_kernel=kw["use_qk_l2norm_in_kernel"],
        )
        for w, i in enumerate(whole):
            A[i] = A_whKK[w]
    return o0, torch.cat([torch.stack(A), B_2hKV], dim=-1)


def _rerun_with_states(q, k, v, g, beta, o0, AB_ghKX, params, kw):
    """Scan the gathered maps for the state entering each chunk, rerun each chunk's continuing
    first document from it and splice the result into ``o0``."""
    _, T, H, K = q.shape
    V = v.shape[-1]
    L, segs = params.chunk_length, _chunk_segments(params)
    S_in = [AB_ghKX.new_zeros(H, K, V)]  # S_in[j]: the state entering global chunk j
    for j in range(max(params.local_chunks)):
        S_in.append(AB_ghKX[j, ..., :K] @ S_in[j] + AB_ghKX[j, ..., K:])
    rerun = [i for i, (_, cont) in enumerate(segs) if cont]
    if not rerun:
        return o0
    first_len = {i: (segs[i][0][1] if len(segs[i][0]) > 1 else L) for i in rerun}
    sel = torch.cat([torch.arange(i * L, i * L + first_len[i], device=q.device) for i in rerun])
    cu_r = [0]
    for i in rerun:
        cu_r.append(cu_r[-1] + first_len[i])
    o1, _ = chunk_gated_delta_rule(
        q[:, sel], k[:, sel], v[:, sel], g[:, sel], beta[:, sel],
        initial_state=torch.stack([S_in[params.local_chunks[i]] for i in rerun]),  # [R, H, K, V]
        cu_seqlens=torch.tensor(cu_r, dtype=torch.int32, device=q.device),
        **kw,
    )  # fmt: skip
    pieces = []
    for i in (0, 1):
        if i in rerun:
            r = rerun.index(i)
            pieces += [o1[:, cu_r[r] : cu_r[r + 1]], o0[:, i * L + first_len[i] : (i + 1) * L]]
        else:
            pieces.append(o0[:, i * L : (i + 1) * L])
    return torch.cat(pieces, dim=1)


def _run(x_1TC, w_CW, g_1Th, beta_1Th, params, head_dims, kw, track: bool):
    """Both gathers and the three local stages. With ``track`` the stages are recorded as
    sub-graphs cut at the gathers (every stage input a fresh leaf), for :class:`_GDNCP`'s
    backward; without it, a plain forward."""
    K, V = head_dims
    _, T, C = x_1TC.shape
    H, L, h = C // (2 * K + V), params.chunk_length, w_CW.shape[-1] - 1
    s = SimpleNamespace()
    s.x, s.w, s.g, s.beta = (_leaf(t, track) for t in (x_1TC, w_CW, g_1Th, beta_1Th))
    # all-gather #1: the conv halo (pre-conv tails of both local chunks); none for a width-1
    # conv, on every rank alike (it depends on the config only)
    s.G1, tails_gchC = None, None
    if h > 0:
        tails_2hC = torch.stack([x_1TC[0, L - h : L], x_1TC[0, T - h : T]])
        s.G1 = _gather(tails_2hC, params.cp_group).requires_grad_(track and x_1TC.requires_grad)
        tails_gchC = global_chunk_order(s.G1)
    # stage 2: conv with halo, zero-state pass, A_j
    s.y = _conv_with_halo(s.x, s.w, tails_gchC, params, "silu")
    q, k, v = s.y.view(1, T, H, 2 * K + V).split([K, K, V], dim=-1)
    s.o0, s.AB = _zero_state_pass(q, k, v, s.g, s.beta, params, kw)
    # all-gather #2: every chunk's (A_j, B_j)
    s.G2 = _gather(s.AB, params.cp_group)
    s.G2.requires_grad_(track and s.AB.requires_grad)
    # stage 3: scan + rerun, from leaves so its backward stops at the stage boundary
    s.y3, s.o03, s.g3, s.beta3 = (_leaf(t, track) for t in (s.y, s.o0, s.g, s.beta))
    q, k, v = s.y3.view(1, T, H, 2 * K + V).split([K, K, V], dim=-1)
    s.o = _rerun_with_states(q, k, v, s.g3, s.beta3, s.o03, global_chunk_order(s.G2), params, kw)
    return s


def _grads(outputs, grad_outputs, inputs) -> list[torch.Tensor | None]:
    """``torch.autograd.grad`` restricted to the pairs that take part (None for the rest)."""
    pairs = [(o, go) for o, go in zip(outputs, grad_outputs) if o.requires_grad and go is not None]
    wanted = [i for i, t in enumerate(inputs) if t is not None and t.requires_grad]
    out = [None] * len(inputs)
    if not pairs or not wanted:
        return out
    got = torch.autograd.grad(
        [o for o, _ in pairs],
        [inputs[i] for i in wanted],
        [go for _, go in pairs],
        allow_unused=True,
    )
    for i, gi in zip(wanted, got):
        out[i] = gi
    return out


def _reduce_own_slice(grad_cX: torch.Tensor | None, like: torch.Tensor, group) -> torch.Tensor:
    """Sum the gathered tensor's gradient over the CP group (zeros where this rank's graph did
    not use it: the collective is issued all the same) and keep this rank's slice."""
    grad_cX = torch.zeros_like(like) if grad_cX is None else grad_cX.contiguous()
    dist.all_reduce(grad_cX, group=group)
    return grad_cX[dist.get_rank(group)]


def _add(a, b):
    return b if a is None else a if b is None else a + b


class _GDNCP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_1TC, w_CW, g_1Th, beta_1Th, params, head_dims, kw):
        with torch.enable_grad():
            s = _run(x_1TC, w_CW, g_1Th, beta_1Th, params, head_dims, kw, track=True)
        ctx.s, ctx.params, ctx.halo = s, params, w_CW.shape[-1] - 1
        return s.o.detach()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_o):
        s, p, h = ctx.s, ctx.params, ctx.halo
        ctx.s = None  # free the sub-graphs with this node
        gy, go0, gg3, gb3, gG2 = _grads([s.o], [grad_o], [s.y3, s.o03, s.g3, s.beta3, s.G2])
        gAB = _reduce_own_slice(gG2, s.G2, p.cp_group)  # all-reduce #2
        gx, gw, gg, gb, gG1 = _grads(
            [s.y, s.o0, s.AB], [gy, go0, gAB], [s.x, s.w, s.g, s.beta, s.G1]
        )
        if h > 0 and s.x.requires_grad:
            g_tails = _reduce_own_slice(gG1, s.G1, p.cp_group)  # all-reduce #1
            gx = torch.zeros_like(s.x) if gx is None else gx.clone()
            L, T = p.chunk_length, s.x.shape[1]
            gx[0, L - h : L] += g_tails[0].to(gx.dtype)
            gx[0, T - h : T] += g_tails[1].to(gx.dtype)
        return gx, gw, _add(gg, gg3), _add(gb, gb3), None, None, None


def gdn_conv_and_recurrence_cp(
    qkv_1TC: torch.Tensor,
    conv_weight_CW: torch.Tensor,
    g_1Th: torch.Tensor,
    beta_1Th: torch.Tensor,
    head_dims: tuple[int, int],
    params: ContextParallelParams,
    backend: str = "auto",
    save_intermediates: bool = False,
) -> torch.Tensor:
    """The GDN mixer's conv + recurrence under CP (what ``OlmoGatedDeltaNet`` runs at CP > 1).

    ``qkv [1, T, C]`` pre-conv per-head ``[q|k|v]`` channels (C = H(2K+V)), ``conv_weight [C,
    W]``, ``g, beta [1, T, H]`` -> ``o [1, T, H, V]`` equal to the 1-rank output at this rank's
    tokens; q and k are L2-normalised in the op and the output scale is K^-1/2, as in the
    1-rank mixer. Issues exactly two collectives in the forward and two in the backward, in a
    fixed order, whatever the documents (module doc).
    """
    K, V = head_dims
    if qkv_1TC.shape[0] != 1:
        raise ValueError(f"context parallelism needs one packed row (batch 1), got {qkv_1TC.shape}")
    kw = dict(
        scale=K**-0.5,
        use_qk_l2norm_in_kernel=True,
        backend=backend,
        save_intermediates=save_intermediates,
    )
    ins = (qkv_1TC, conv_weight_CW, g_1Th, beta_1Th)
    if torch.is_grad_enabled() and any(t.requires_grad for t in ins):
        o = _GDNCP.apply(*ins, params, head_dims, kw)
    else:
        o = _run(*ins, params, head_dims, kw, track=False).o
    _, T, C = qkv_1TC.shape
    return o.view(1, T, C // (2 * K + V), V)
