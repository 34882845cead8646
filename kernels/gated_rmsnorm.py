"""Fused gated RMSNorm (norm before gate, SiLU gate), as the GDN mixer applies it per head.

Shape legend: R rows (all leading dims flattened), V row width (head value dim, 16..256;
192 for Olmo Hybrid), G backward programs (each owns a fixed set of row blocks).

``y = (w * (x32 * rsqrt(mean(x32^2) + eps)).to(x.dtype)) * silu(gate32)``, then ``.to(x.dtype)``,
with ``x32 = x.float()``, ``gate32 = gate.float()``: the cast order of
``megatron_hybrid/layers/gdn.py`` and HF transformers' ``Qwen3NextRMSNormGated``. The Triton
forward reproduces the intermediate roundings (normalised x rounded to x's dtype; ``w * n``
rounded when torch would compute it in x's half dtype), so in bf16 it matches torch up to
fp32 reduction-order differences. The backward is computed in fp32 throughout.

``dweight`` is deterministic: each backward program accumulates its rows' contribution in
registers and writes one [V] partial; the [G, V] partials are summed by torch in a fixed order
(G depends only on the row count and the device).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import triton_interpreting
from .rows import as_rows, row_stride

try:
    import triton
    import triton.language as tl

    _jit = triton.jit
except ImportError:  # pragma: no cover - no triton: only the torch backend
    triton = tl = None

    def _jit(fn):
        return fn


BACKENDS = ("auto", "torch", "triton")


def gated_rmsnorm_torch(
    x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5
) -> torch.Tensor:
    """Reference (autograd through torch ops): exactly the GDN mixer's expression."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    y = (weight * x32.to(x.dtype)) * F.silu(gate.float())
    return y.to(x.dtype)


def gated_rmsnorm(
    x: torch.Tensor,
    gate: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-5,
    backend: str = "auto",
) -> torch.Tensor:
    """Gated RMSNorm over the last dim.

    Args:
        x: [..., V] the values to normalise (GDN output per head).
        gate: [..., V] same shape as x (may be a strided view, e.g. a slice of a projection).
        weight: [V].
        eps: added to the mean square.
        backend: "torch", "triton", or "auto" (Triton for CUDA tensors or under
            TRITON_INTERPRET=1, else torch).

    Returns:
        y [..., V] in x's dtype.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown norm backend {backend!r}; valid backends: {', '.join(BACKENDS)}")
    if gate.shape != x.shape or weight.shape != x.shape[-1:]:
        raise ValueError(
            f"gate must match x {tuple(x.shape)} and weight be [{x.shape[-1]}]; got "
            f"{tuple(gate.shape)}, {tuple(weight.shape)}"
        )
    if backend == "auto":
        use_triton = (x.is_cuda or triton_interpreting()) and triton is not None
        backend = "triton" if use_triton else "torch"
    if backend == "torch":
        return gated_rmsnorm_torch(x, gate, weight, eps)
    if triton is None:
        raise RuntimeError("backend='triton' needs triton, which is not installed")
    return gated_rmsnorm_triton(x, gate, weight, eps)


# ---- Triton -------------------------------------------------------------------------------


@_jit
def _gated_rmsnorm_fwd_kernel(
    x_ptr,  # [R, V] row stride sx
    g_ptr,  # [R, V] row stride sg
    w_ptr,  # [V]
    y_ptr,  # [R, V] contiguous, x dtype
    rstd_ptr,  # [R] fp32 out
    R,
    V,
    sx,
    sg,
    eps,
    BR: tl.constexpr,
    BV: tl.constexpr,
    ROUND_P: tl.constexpr,  # torch computes w * n in x's (half) dtype: round it there too
):
    r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    v = tl.arange(0, BV)
    r_ok = r < R
    v_ok = v < V
    m = r_ok[:, None] & v_ok[None, :]
    x = tl.load(x_ptr + r[:, None] * sx + v[None, :], mask=m, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + r[:, None] * sg + v[None, :], mask=m, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + v, mask=v_ok, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / V + eps)
    n = (x * rstd[:, None]).to(y_ptr.dtype.element_ty).to(tl.float32)
    p = w[None, :] * n
    if ROUND_P:
        p = p.to(y_ptr.dtype.element_ty).to(tl.float32)
    y = p * (g * tl.sigmoid(g))
    tl.store(y_ptr + r[:, None] * V + v[None, :], y.to(y_ptr.dtype.element_ty), mask=m)
    tl.store(rstd_ptr + r, rstd, mask=r_ok)


@_jit
def _gated_rmsnorm_bwd_kernel(
    x_ptr,  # [R, V] row stride sx
    g_ptr,  # [R, V] row stride sg
    w_ptr,  # [V]
    rstd_ptr,  # [R] fp32
    dy_ptr,  # [R, V] row stride sdy
    dx_ptr,  # [R, V] contiguous out
    dg_ptr,  # [R, V] contiguous out
    dwp_ptr,  # [G, V] fp32 out: this program's dweight partial
    R,
    V,
    sx,
    sg,
    sdy,
    NB,  # row blocks
    G,  # programs (the grid size)
    BR: tl.constexpr,
    BV: tl.constexpr,
    ROUND_P: tl.constexpr,
):
    pid = tl.program_id(0)
    v = tl.arange(0, BV)
    v_ok = v < V
    w = tl.load(w_ptr + v, mask=v_ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BV], dtype=tl.float32)
    # blocks pid, pid + G, ...: fixed per program, so dw is deterministic. A while loop because
    # the interpreter cannot use a runtime int as a range() bound under numpy >= 2.5.
    blk = pid
    while blk < NB:
        r = blk.to(tl.int64) * BR + tl.arange(0, BR)
        r_ok = r < R
        m = r_ok[:, None] & v_ok[None, :]
        x = tl.load(x_ptr + r[:, None] * sx + v[None, :], mask=m, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + r[:, None] * sg + v[None, :], mask=m, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + r[:, None] * sdy + v[None, :], mask=m, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + r, mask=r_ok, other=0.0)
        xhat = x * rstd[:, None]
        # autograd differentiates through the rounded n and p of the forward: use them too
        n = xhat.to(dx_ptr.dtype.element_ty).to(tl.float32)
        p = w[None, :] * n
        if ROUND_P:
            p = p.to(dx_ptr.dtype.element_ty).to(tl.float32)
        sig = tl.sigmoid(g)
        dg = dy * p * sig * (1.0 + g * (1.0 - sig))
        dp = dy * (g * sig)
        dw += tl.sum(dp * n, axis=0)
        dn = dp * w[None, :]
        # d/dx of x * rsqrt(mean(x^2) + eps)
        dx = rstd[:, None] * (dn - xhat * (tl.sum(dn * xhat, axis=1) / V)[:, None])
        tl.store(dx_ptr + r[:, None] * V + v[None, :], dx.to(dx_ptr.dtype.element_ty), mask=m)
        tl.store(dg_ptr + r[:, None] * V + v[None, :], dg.to(dg_ptr.dtype.element_ty), mask=m)
        blk += G
    tl.store(dwp_ptr + pid * V + v, dw, mask=v_ok)


def _gpu_sizes(x: torch.Tensor) -> bool:
    """Tile sizes for compiled kernels on a GPU (else the interpreter's small ones).
    tools/kernel_resources.py overrides this to compile the GPU's kernels on a CPU."""
    return x.is_cuda and not triton.knobs.runtime.interpret


def _tiles(x: torch.Tensor, V: int) -> tuple[int, int]:
    """(BR, BV): ~2K-element tiles on the GPU (16 fp32 values per thread and tile at 4 warps;
    the backward keeps several tiles live); few rows in the interpreter so that small test
    shapes span several blocks and several backward programs."""
    BV = triton.next_power_of_2(V)
    if _gpu_sizes(x):
        return max(1, 2048 // BV), BV
    return 4, BV


class _GatedRMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2_RV, g2_RV, weight_V, eps: float):
        R, V = x2_RV.shape
        BR, BV = _tiles(x2_RV, V)
        y_RV = torch.empty((R, V), dtype=x2_RV.dtype, device=x2_RV.device)
        rstd_R = torch.empty((R,), dtype=torch.float32, device=x2_RV.device)
        round_p = (
            torch.promote_types(weight_V.dtype, x2_RV.dtype) == x2_RV.dtype
            and x2_RV.dtype != torch.float32
        )
        if R > 0:
            _gated_rmsnorm_fwd_kernel[(triton.cdiv(R, BR),)](
                x2_RV,
                g2_RV,
                weight_V,
                y_RV,
                rstd_R,
                R,
                V,
                row_stride(x2_RV),
                row_stride(g2_RV),
                eps,
                BR=BR,
                BV=BV,
                ROUND_P=round_p,
            )
        ctx.save_for_backward(x2_RV, g2_RV, weight_V, rstd_R)
        ctx.round_p = round_p
        return y_RV

    @staticmethod
    def backward(ctx, dy_RV):
        x2_RV, g2_RV, weight_V, rstd_R = ctx.saved_tensors
        R, V = x2_RV.shape
        BR, BV = _tiles(x2_RV, V)
        if dy_RV.stride(-1) != 1:
            dy_RV = dy_RV.contiguous()
        NB = triton.cdiv(R, BR)
        # a persistent grid of 4 programs per SM, each looping over its row blocks. (Measured
        # on the H200 at [983040, 192]: fwd+bwd 1.66 ms; a grid of many short programs with 4
        # unrolled blocks each, tried 2026-11-30, took 2.77.)
        if x2_RV.is_cuda and not triton.knobs.runtime.interpret:
            sms = torch.cuda.get_device_properties(x2_RV.device).multi_processor_count
            G = min(NB, 4 * sms)
        else:
            G = min(NB, 3)
        G = max(G, 1)
        dx_RV = torch.empty((R, V), dtype=x2_RV.dtype, device=x2_RV.device)
        dg_RV = torch.empty((R, V), dtype=g2_RV.dtype, device=x2_RV.device)
        dw_GV = torch.zeros((G, V), dtype=torch.float32, device=x2_RV.device)
        if R > 0:
            _gated_rmsnorm_bwd_kernel[(G,)](
                x2_RV,
                g2_RV,
                weight_V,
                rstd_R,
                dy_RV,
                dx_RV,
                dg_RV,
                dw_GV,
                R,
                V,
                row_stride(x2_RV),
                row_stride(g2_RV),
                row_stride(dy_RV),
                NB,
                G,
                BR=BR,
                BV=BV,
                ROUND_P=ctx.round_p,
            )
        dweight_V = dw_GV.sum(dim=0).to(weight_V.dtype)  # fixed-order reduction
        return dx_RV, dg_RV, dweight_V, None


def gated_rmsnorm_triton(
    x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5
) -> torch.Tensor:
    """Triton forward + backward of :func:`gated_rmsnorm_torch` (see :func:`gated_rmsnorm`)."""
    y_RV = _GatedRMSNormFn.apply(as_rows(x), as_rows(gate), weight.contiguous(), float(eps))
    return y_RV.view(x.shape)
