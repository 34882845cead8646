"""Triton causal depthwise conv1d (+ SiLU) with packed-document resets, forward and backward.

Shape legend: B batch, T time, C channels, W kernel width (2..8; 4 for Olmo Hybrid),
P partial-sum slots (B x time blocks).

Same semantics as :func:`~.conv.causal_conv1d_torch` (which is the reference)::

    y[t, c] = act( sum_{j<W} w[c, j] * x[t - (W-1) + j, c] )

with x = 0 before the token's document start when ``cu_seqlens`` is given, and otherwise the
rows of ``initial_state`` [B, W-1, C] standing in for x[-(W-1) .. -1]. Note that, like the
reference, ``cu_seqlens`` masks *every* tap that reaches before a document start, including the
first document's taps into ``initial_state``: with packed documents the initial state is unused.

Design:
- One program per (time block, channel block, batch row); the W shifted input tiles are loaded
  from global memory (they overlap, so they are served from L1/L2) and accumulated in fp32.
- Backward recomputes the pre-activation instead of saving it (memory-bound op; W*(W+1) tile
  loads beat a [B, T, C] fp32 round trip). The same kernel writes dx, d(initial_state) (rows
  -(W-1)..-1, covered by starting the row blocks at -(W-1)) and per-block partial sums of dweight
  into a [P, W, C] buffer that is then summed in a fixed order: deterministic, no atomics.
- The final conv state (last W-1 rows of [initial_state; x]) is a slice, done in torch so
  autograd routes its gradient without a kernel.
- CPU tests run the same kernels in Triton's interpreter (TRITON_INTERPRET=1, which must be set
  before triton is first imported: triton binds its own library functions at import).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .conv import _doc_start_index

MAX_WIDTH = 8


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return bool(triton.knobs.runtime.interpret)


def _blocks(x: torch.Tensor, C: int, backward: bool) -> tuple[int, int, int]:
    """(BT, BC, num_warps): ~16-32 fp32 values per thread per tile on the GPU (the backward keeps
    more tiles live); small tiles in the interpreter so that tests with small odd sizes still
    cross time and channel block boundaries."""
    if x.is_cuda and not interpreting():
        return (32 if backward else 64), min(128, triton.next_power_of_2(C)), 8
    return 16, min(32, triton.next_power_of_2(C)), 4


@triton.jit
def _conv_fwd_kernel(
    x_ptr,  # [B, T, C]
    w_ptr,  # [C, W]
    h_ptr,  # [B, W-1, C] initial state (x dtype), unused unless HAS_INIT
    start_ptr,  # [T] int32 document start per token, unused unless HAS_DOCS
    y_ptr,  # [B, T, C]
    T,
    C,
    W: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
    HAS_INIT: tl.constexpr,
    HAS_DOCS: tl.constexpr,
    SILU: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    t = pid_t * BT + tl.arange(0, BT)
    c = pid_c * BC + tl.arange(0, BC)
    t_ok = t < T
    c_ok = c < C
    x_base = x_ptr + b * T * C
    h_base = h_ptr + b * (W - 1) * C
    if HAS_DOCS:
        st = tl.load(start_ptr + t, mask=t_ok, other=0)
    acc = tl.zeros([BT, BC], dtype=tl.float32)
    for j in tl.static_range(W):
        src = t - (W - 1) + j  # input row read by tap j
        ok = t_ok
        if HAS_DOCS:
            ok = ok & (src >= st)
        m = ok[:, None] & c_ok[None, :]
        xv = tl.load(
            x_base + src.to(tl.int64)[:, None] * C + c[None, :],
            mask=m & (src >= 0)[:, None],
            other=0.0,
        ).to(tl.float32)
        if HAS_INIT:
            # rows before the sequence start come from the initial state (row W-1+src)
            xv += tl.load(
                h_base + (src + (W - 1))[:, None] * C + c[None, :],
                mask=m & (src < 0)[:, None],
                other=0.0,
            ).to(tl.float32)
        wj = tl.load(w_ptr + c * W + j, mask=c_ok, other=0.0).to(tl.float32)
        acc += xv * wj[None, :]
    if SILU:
        acc = acc * tl.sigmoid(acc)
    out = y_ptr + b * T * C + t.to(tl.int64)[:, None] * C + c[None, :]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=t_ok[:, None] & c_ok[None, :])


@triton.jit
def _conv_bwd_kernel(
    x_ptr,  # [B, T, C]
    w_ptr,  # [C, W]
    h_ptr,  # [B, W-1, C]
    start_ptr,  # [T] int32
    dy_ptr,  # [B, T, C]
    dx_ptr,  # [B, T, C] out
    dh_ptr,  # [B, W-1, C] out (fp32), unused unless HAS_INIT
    dwp_ptr,  # [P, W, C] fp32 out: per-block partial sums of dweight
    T,
    C,
    ROW0,  # first input row handled: -(W-1) with an initial state (its gradient), else 0
    NBT,  # time blocks per batch row
    W: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
    HAS_INIT: tl.constexpr,
    HAS_DOCS: tl.constexpr,
    SILU: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    s = ROW0 + pid_t * BT + tl.arange(0, BT)  # input rows whose gradient this block owns
    c = pid_c * BC + tl.arange(0, BC)
    c_ok = c < C
    x_base = x_ptr + b * T * C
    h_base = h_ptr + b * (W - 1) * C
    dy_base = dy_ptr + b * T * C
    dx = tl.zeros([BT, BC], dtype=tl.float32)
    for d in tl.static_range(W):
        # output row tt = s + d reads input row s through tap W-1-d
        tt = s + d
        tt_ok = (tt >= 0) & (tt < T)
        if HAS_DOCS:
            st = tl.load(start_ptr + tt, mask=tt_ok, other=0)
        # recompute the pre-activation at rows tt (same sum as the forward)
        pre = tl.zeros([BT, BC], dtype=tl.float32)
        for j in tl.static_range(W):
            src = tt - (W - 1) + j
            ok = tt_ok
            if HAS_DOCS:
                ok = ok & (src >= st)
            m = ok[:, None] & c_ok[None, :]
            xv = tl.load(
                x_base + src.to(tl.int64)[:, None] * C + c[None, :],
                mask=m & (src >= 0)[:, None],
                other=0.0,
            ).to(tl.float32)
            if HAS_INIT:
                xv += tl.load(
                    h_base + (src + (W - 1))[:, None] * C + c[None, :],
                    mask=m & (src < 0)[:, None],
                    other=0.0,
                ).to(tl.float32)
            wj = tl.load(w_ptr + c * W + j, mask=c_ok, other=0.0).to(tl.float32)
            pre += xv * wj[None, :]
        dpre = tl.load(
            dy_base + tt.to(tl.int64)[:, None] * C + c[None, :],
            mask=tt_ok[:, None] & c_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        if SILU:
            sig = tl.sigmoid(pre)
            dpre = dpre * sig * (1.0 + pre * (1.0 - sig))
        valid = tt_ok
        if HAS_DOCS:
            valid = valid & (s >= st)  # input row s lies in output row tt's document
        w_tap = tl.load(w_ptr + c * W + (W - 1 - d), mask=c_ok, other=0.0).to(tl.float32)
        dx += tl.where(valid[:, None], dpre, 0.0) * w_tap[None, :]
        if d == 0:
            # dweight[c, j] += sum over this block's output rows s of dpre[s] * x_tap_j[s]
            # (dpre is 0 on rows outside [0, T), so the d(initial_state) rows add nothing)
            part = dwp_ptr + (b * NBT + pid_t) * W * C
            for j in tl.static_range(W):
                src = s - (W - 1) + j
                ok = tt_ok
                if HAS_DOCS:
                    ok = ok & (src >= st)
                m = ok[:, None] & c_ok[None, :]
                xv = tl.load(
                    x_base + src.to(tl.int64)[:, None] * C + c[None, :],
                    mask=m & (src >= 0)[:, None],
                    other=0.0,
                ).to(tl.float32)
                if HAS_INIT:
                    xv += tl.load(
                        h_base + (src + (W - 1))[:, None] * C + c[None, :],
                        mask=m & (src < 0)[:, None],
                        other=0.0,
                    ).to(tl.float32)
                tl.store(part + j * C + c, tl.sum(dpre * xv, axis=0), mask=c_ok)
    in_x = (s >= 0) & (s < T)
    tl.store(
        dx_ptr + b * T * C + s.to(tl.int64)[:, None] * C + c[None, :],
        dx.to(dx_ptr.dtype.element_ty),
        mask=in_x[:, None] & c_ok[None, :],
    )
    if HAS_INIT:
        tl.store(
            dh_ptr + b * (W - 1) * C + (s + (W - 1))[:, None] * C + c[None, :],
            dx,
            mask=(s < 0)[:, None] & c_ok[None, :],
        )


class _CausalConv1dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_BTC, weight_CW, h_BWC, start_T, silu: bool):
        B, T, C = x_BTC.shape
        W = weight_CW.shape[1]
        y_BTC = torch.empty(
            (B, T, C), dtype=torch.promote_types(x_BTC.dtype, weight_CW.dtype), device=x_BTC.device
        )
        BT, BC, warps = _blocks(x_BTC, C, backward=False)
        grid = (triton.cdiv(T, BT), triton.cdiv(C, BC), B)
        _conv_fwd_kernel[grid](
            x_BTC,
            weight_CW,
            h_BWC if h_BWC is not None else x_BTC,
            start_T if start_T is not None else x_BTC,
            y_BTC,
            T,
            C,
            W=W,
            BT=BT,
            BC=BC,
            HAS_INIT=h_BWC is not None,
            HAS_DOCS=start_T is not None,
            SILU=silu,
            num_warps=warps,
        )
        ctx.save_for_backward(x_BTC, weight_CW, h_BWC, start_T)
        ctx.silu = silu
        return y_BTC

    @staticmethod
    def backward(ctx, dy_BTC):
        x_BTC, weight_CW, h_BWC, start_T = ctx.saved_tensors
        B, T, C = x_BTC.shape
        W = weight_CW.shape[1]
        dy_BTC = dy_BTC.contiguous()
        has_init = h_BWC is not None
        BT, BC, warps = _blocks(x_BTC, C, backward=True)
        row0 = -(W - 1) if has_init else 0
        NBT = triton.cdiv(T - row0, BT)
        dx_BTC = torch.empty_like(x_BTC)
        dh_BWC = torch.empty((B, W - 1, C), dtype=torch.float32, device=x_BTC.device)
        dw_PWC = torch.empty((B * NBT, W, C), dtype=torch.float32, device=x_BTC.device)
        grid = (NBT, triton.cdiv(C, BC), B)
        _conv_bwd_kernel[grid](
            x_BTC,
            weight_CW,
            h_BWC if has_init else x_BTC,
            start_T if start_T is not None else x_BTC,
            dy_BTC,
            dx_BTC,
            dh_BWC,
            dw_PWC,
            T,
            C,
            row0,
            NBT,
            W=W,
            BT=BT,
            BC=BC,
            HAS_INIT=has_init,
            HAS_DOCS=start_T is not None,
            SILU=ctx.silu,
            num_warps=warps,
        )
        # fixed-order reduction of the per-block partial sums (deterministic)
        dweight_CW = dw_PWC.sum(dim=0).t().to(weight_CW.dtype)
        dh = dh_BWC.to(h_BWC.dtype) if has_init else None
        return dx_BTC, dweight_CW, dh, None, None


def causal_conv1d_triton(
    x_BTC: torch.Tensor,
    weight_CW: torch.Tensor,
    cu_seqlens: torch.Tensor | None = None,
    activation: str | None = "silu",
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
):
    """Triton version of :func:`~.conv.causal_conv1d_torch` (same arguments and results).

    Returns y [B, T, C] in ``promote_types(x.dtype, weight.dtype)`` (accumulated in fp32), and
    with ``output_final_state`` also the last W-1 rows of ``[initial_state; x]`` [B, W-1, C]:
    the ``initial_state`` of a following chunk of the same sequences (the previous shard's tail
    under context parallelism, or the conv state for generation).
    """
    B, T, C = x_BTC.shape
    W = weight_CW.shape[-1]
    if weight_CW.shape != (C, W):
        raise ValueError(f"conv weight must be [C={C}, W], got {tuple(weight_CW.shape)}")
    if not 1 <= W <= MAX_WIDTH:
        raise ValueError(f"conv width must be in 1..{MAX_WIDTH}, got {W}")
    if cu_seqlens is not None and B != 1:
        raise ValueError(f"packed sequences (cu_seqlens) need batch size 1, got {B}")
    if activation not in ("silu", None, "identity"):
        raise ValueError(f"unsupported activation {activation!r}")
    if initial_state is not None and initial_state.shape != (B, W - 1, C):
        raise ValueError(
            f"initial_state must be [B, W-1, C] = [{B}, {W - 1}, {C}], "
            f"got {tuple(initial_state.shape)}"
        )
    history = None if initial_state is None else initial_state.to(x_BTC.dtype)
    if T == 0:
        y = x_BTC.new_zeros((B, 0, C), dtype=torch.promote_types(x_BTC.dtype, weight_CW.dtype))
        y = y + 0 * weight_CW.sum()  # keep the graph connected for autograd
    else:
        start_T = None
        if cu_seqlens is not None:
            start_T = _doc_start_index(cu_seqlens, T).to(torch.int32)
        h_BWC = history.contiguous() if (history is not None and W > 1) else None
        y = _CausalConv1dFn.apply(
            x_BTC.contiguous(), weight_CW.contiguous(), h_BWC, start_T, activation == "silu"
        )
    if not output_final_state:
        return y
    if W == 1:
        return y, x_BTC[:, :0]
    if history is None:
        history = x_BTC.new_zeros(B, W - 1, C)
    tail = torch.cat([history, x_BTC[:, -(W - 1) :]], dim=1)[:, -(W - 1) :]
    return y, tail.clone()


# ---- single-token update (decode) --------------------------------------------------------


@triton.jit
def _conv_update_kernel(
    x_ptr,  # [B, C]
    s_ptr,  # [B, W-1, C] conv state
    w_ptr,  # [C, W]
    y_ptr,  # [B, C] out
    ns_ptr,  # [B, W-1, C] out: new conv state
    C,
    W: tl.constexpr,
    BC: tl.constexpr,
    SILU: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    c_ok = c < C
    xv = tl.load(x_ptr + b * C + c, mask=c_ok, other=0.0)
    acc = xv.to(tl.float32) * tl.load(w_ptr + c * W + (W - 1), mask=c_ok, other=0.0).to(tl.float32)
    s_base = s_ptr + b * (W - 1) * C
    ns_base = ns_ptr + b * (W - 1) * C
    for j in tl.static_range(W - 1):
        sv = tl.load(s_base + j * C + c, mask=c_ok, other=0.0)
        acc += sv.to(tl.float32) * tl.load(w_ptr + c * W + j, mask=c_ok, other=0.0).to(tl.float32)
        if j > 0:  # shift the window by one: new row j-1 = old row j
            tl.store(ns_base + (j - 1) * C + c, sv, mask=c_ok)
    tl.store(ns_base + (W - 2) * C + c, xv.to(ns_ptr.dtype.element_ty), mask=c_ok)
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(y_ptr + b * C + c, acc.to(y_ptr.dtype.element_ty), mask=c_ok)


def causal_conv1d_update_torch(
    x_BC: torch.Tensor,
    conv_state_BWC: torch.Tensor,
    weight_CW: torch.Tensor,
    activation: str | None = "silu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference single-token step: the conv over [conv_state; x], and the state shifted by x."""
    window_BWC = torch.cat([conv_state_BWC.to(x_BC.dtype), x_BC[:, None]], dim=1)  # [B, W, C]
    y_BC = (window_BWC * weight_CW.t()[None]).sum(dim=1)
    if activation == "silu":
        y_BC = torch.nn.functional.silu(y_BC)
    elif activation not in (None, "identity"):
        raise ValueError(f"unsupported activation {activation!r}")
    new_state_BWC = torch.cat([conv_state_BWC[:, 1:], x_BC[:, None].to(conv_state_BWC.dtype)], 1)
    return y_BC, new_state_BWC


def causal_conv1d_update(
    x_BC: torch.Tensor,
    conv_state_BWC: torch.Tensor,
    weight_CW: torch.Tensor,
    activation: str | None = "silu",
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step of the causal conv.

    Args:
        x_BC: the new token's inputs [B, C].
        conv_state_BWC: the previous W-1 inputs [B, W-1, C], oldest first (exactly the
            ``final_state`` of :func:`causal_conv1d_triton` / the reference).
        weight_CW: [C, W].
        activation: "silu" or None.
        backend: "auto" (Triton on CUDA or under TRITON_INTERPRET=1, else torch), "triton",
            "torch".

    Returns:
        ``(y [B, C] in promote_types(x, weight), new_state [B, W-1, C] in the state's dtype)``;
        the input state is not modified.
    """
    B, C = x_BC.shape
    W = weight_CW.shape[-1]
    if weight_CW.shape != (C, W) or conv_state_BWC.shape != (B, W - 1, C):
        raise ValueError(
            f"expected x [B, C], state [B, W-1, C], weight [C, W]; got {tuple(x_BC.shape)}, "
            f"{tuple(conv_state_BWC.shape)}, {tuple(weight_CW.shape)}"
        )
    if backend == "auto":
        backend = "triton" if (x_BC.is_cuda or interpreting()) else "torch"
    if backend == "torch" or W < 2:
        return causal_conv1d_update_torch(x_BC, conv_state_BWC, weight_CW, activation)
    if backend != "triton":
        raise ValueError(f"unknown conv backend {backend!r}")
    if activation not in ("silu", None, "identity"):
        raise ValueError(f"unsupported activation {activation!r}")
    x_BC = x_BC.contiguous()
    state = conv_state_BWC.contiguous()
    y_BC = torch.empty(
        (B, C), dtype=torch.promote_types(x_BC.dtype, weight_CW.dtype), device=x_BC.device
    )
    new_state = torch.empty_like(state)
    BC = min(256 if x_BC.is_cuda else 32, triton.next_power_of_2(C))
    _conv_update_kernel[(B, triton.cdiv(C, BC))](
        x_BC,
        state,
        weight_CW.contiguous(),
        y_BC,
        new_state,
        C,
        W=W,
        BC=BC,
        SILU=activation == "silu",
    )
    return y_BC, new_state
