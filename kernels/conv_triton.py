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
- Widths <= 4 (Olmo Hybrid's 4): "rolling" kernels. One program per (time block, channel
  block, batch row) walks its time block row by row, keeping the last three input rows (and in
  the backward the last three dpre rows) in registers, so each element is loaded once per pass
  and the backward evaluates the activation once per element. Widths 5..8: tile kernels that load
  the W shifted [time, channel] tiles (served from L1/L2) and, in the backward, recompute the
  pre-activation once per tap (W * (W + 2) tile loads per block).
- Backward recomputes the pre-activation instead of saving it (memory-bound op: a [B, T, C] fp32
  round trip costs more). The same kernel writes dx, d(initial_state) (rows -(W-1)..-1, covered
  by starting the row blocks at -(W-1)) and per-block partial sums of dweight into a [P, W, C]
  buffer that is then summed in a fixed order: deterministic, no atomics.
- The final conv state (last W-1 rows of [initial_state; x]) is a slice, done in torch so
  autograd routes its gradient without a kernel.
- CPU tests run the same kernels in Triton's interpreter (TRITON_INTERPRET=1, which must be set
  before triton is first imported: triton binds its own library functions at import).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .doc_boundaries import doc_start_index

MAX_WIDTH = 8


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return bool(triton.knobs.runtime.interpret)


def _gpu_sizes(x: torch.Tensor) -> bool:
    """Block sizes for compiled kernels on a GPU (else the interpreter's small ones).
    tools/kernel_resources.py overrides this to compile the GPU's kernels on a CPU."""
    return x.is_cuda and not interpreting()


def _blocks(x: torch.Tensor, C: int, backward: bool, rolling: bool) -> tuple[int, int, int]:
    """(BT, BC, num_warps). Tile kernels (widths > 4): ~16-32 fp32 values per thread per tile
    (the backward keeps more tiles live). Rolling kernels: BT rows walked per program, [BC] rows
    of 4 values per thread. Small blocks in the interpreter, so that tests with small odd sizes
    still cross time and channel block boundaries."""
    gpu = _gpu_sizes(x)
    if rolling:
        return (64, min(512, triton.next_power_of_2(C)), 4) if gpu else (8, 16, 4)
    if gpu:
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


# ---- rolling-window kernels for widths <= 4 (Olmo Hybrid: 4) -------------------------------
# One program walks BT rows of a BC-wide channel block in time order, one [BC] row per step,
# keeping the last three input rows (and in the backward the last three dpre rows) in registers:
# every element is loaded once per pass instead of W (forward) or W * (W + 2) (backward) times,
# and the backward evaluates the activation once per element instead of W times. Widths below 4
# run as 4 taps with zero weights in front (exactly the same sums). Tap j' (0..3) of output row
# t reads input row t - 3 + j'.


@triton.jit
def _tap_weight(w_ptr, c, c_ok, jp: tl.constexpr, W: tl.constexpr):
    """Weight of padded tap jp (0..3) for channels c: w[c, jp - (4 - W)], zero in the padding."""
    if jp >= 4 - W:
        return tl.load(w_ptr + c * W + (jp - (4 - W)), mask=c_ok, other=0.0).to(tl.float32)
    else:
        return tl.full(c.shape, 0.0, tl.float32)


@triton.jit
def _input_row(x_base, h_base, r, T, C, c, c_ok, W: tl.constexpr, HAS_INIT: tl.constexpr):
    """Input row r as float32 [BC]: x[r] for 0 <= r < T, initial-state row W - 1 + r for
    -(W - 1) <= r < 0 (HAS_INIT), else zeros."""
    xv = tl.load(x_base + r.to(tl.int64) * C + c, mask=c_ok & (r >= 0) & (r < T), other=0.0)
    xv = xv.to(tl.float32)
    if HAS_INIT:
        hv = tl.load(h_base + (r + (W - 1)) * C + c, mask=c_ok & (r < 0) & (r >= 1 - W), other=0.0)
        xv += hv.to(tl.float32)
    return xv


@triton.jit
def _doc_start(start_ptr, t, T, HAS_DOCS: tl.constexpr):
    """Document start of row t (HAS_DOCS), else a start no tap reaches before."""
    if HAS_DOCS:
        return tl.load(start_ptr + t, mask=(t >= 0) & (t < T), other=0)
    else:
        return t * 0 - 8


@triton.jit
def _pre_activation(x3, x2, x1, x0, w0, w1, w2, w3, t, st):
    """Output row t's conv sum from input rows t-3 .. t, taps before the document start st
    dropped."""
    acc = tl.where(t - 3 >= st, x3 * w0, 0.0)
    acc += tl.where(t - 2 >= st, x2 * w1, 0.0)
    acc += tl.where(t - 1 >= st, x1 * w2, 0.0)
    return acc + x0 * w3


@triton.jit
def _conv4_fwd_kernel(
    x_ptr, w_ptr, h_ptr, start_ptr, y_ptr, T, C,
    W: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
    HAS_INIT: tl.constexpr, HAS_DOCS: tl.constexpr, SILU: tl.constexpr,
):  # fmt: skip
    t0 = tl.program_id(0) * BT
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    b = tl.program_id(2).to(tl.int64)
    c_ok = c < C
    x_base = x_ptr + b * T * C
    h_base = h_ptr + b * (W - 1) * C
    y_base = y_ptr + b * T * C
    w0 = _tap_weight(w_ptr, c, c_ok, 0, W)
    w1 = _tap_weight(w_ptr, c, c_ok, 1, W)
    w2 = _tap_weight(w_ptr, c, c_ok, 2, W)
    w3 = _tap_weight(w_ptr, c, c_ok, 3, W)
    x3 = _input_row(x_base, h_base, t0 - 3, T, C, c, c_ok, W, HAS_INIT)
    x2 = _input_row(x_base, h_base, t0 - 2, T, C, c, c_ok, W, HAS_INIT)
    x1 = _input_row(x_base, h_base, t0 - 1, T, C, c, c_ok, W, HAS_INIT)
    for i0 in range(0, BT, 4):  # unrolled by 4: four rows' loads in flight at once
        for u in tl.static_range(4):
            t = t0 + i0 + u
            x0 = _input_row(x_base, h_base, t, T, C, c, c_ok, W, HAS_INIT)
            acc = _pre_activation(
                x3, x2, x1, x0, w0, w1, w2, w3, t, _doc_start(start_ptr, t, T, HAS_DOCS)
            )
            if SILU:
                acc = acc * tl.sigmoid(acc)
            tl.store(
                y_base + t.to(tl.int64) * C + c, acc.to(y_ptr.dtype.element_ty), mask=c_ok & (t < T)
            )
            x3, x2, x1 = x2, x1, x0


@triton.jit
def _conv4_bwd_kernel(
    x_ptr, w_ptr, h_ptr, start_ptr, dy_ptr, dx_ptr, dh_ptr, dwp_ptr, T, C, ROW0, NBT,
    W: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
    HAS_INIT: tl.constexpr, HAS_DOCS: tl.constexpr, SILU: tl.constexpr,
):  # fmt: skip
    """Owns input rows s in [s0, s0 + BT) (their dx, or d(initial_state) for s < 0) and output
    rows t in the same range (their share of dweight, stored as one partial row of dwp). Walks
    t = s0 .. s0 + BT + 2: dpre[t] from the recomputed pre-activation, then
    dx[t - 3] = sum_d dpre[t - 3 + d] w[3 - d] over the taps inside row t - 3 + d's document."""
    pid_t = tl.program_id(0)
    s0 = ROW0 + pid_t * BT
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    b = tl.program_id(2).to(tl.int64)
    c_ok = c < C
    x_base = x_ptr + b * T * C
    h_base = h_ptr + b * (W - 1) * C
    dy_base = dy_ptr + b * T * C
    w0 = _tap_weight(w_ptr, c, c_ok, 0, W)
    w1 = _tap_weight(w_ptr, c, c_ok, 1, W)
    w2 = _tap_weight(w_ptr, c, c_ok, 2, W)
    w3 = _tap_weight(w_ptr, c, c_ok, 3, W)
    x3 = _input_row(x_base, h_base, s0 - 3, T, C, c, c_ok, W, HAS_INIT)
    x2 = _input_row(x_base, h_base, s0 - 2, T, C, c, c_ok, W, HAS_INIT)
    x1 = _input_row(x_base, h_base, s0 - 1, T, C, c, c_ok, W, HAS_INIT)
    zero = tl.full([BC], 0.0, tl.float32)
    d3, d2, d1 = zero, zero, zero  # dpre of rows t-3, t-2, t-1
    st2 = s0 * 0  # document starts of rows t-3, t-2, t-1 (only read when HAS_DOCS)
    st1 = s0 * 0
    st3 = s0 * 0
    dw0, dw1, dw2, dw3 = zero, zero, zero, zero
    for i0 in range(0, BT + 4, 4):  # unrolled by 4 (one step past BT + 3: masked off)
        for u in tl.static_range(4):
            i = i0 + u
            t = s0 + i
            x0 = _input_row(x_base, h_base, t, T, C, c, c_ok, W, HAS_INIT)
            st0 = _doc_start(start_ptr, t, T, HAS_DOCS)
            pre = _pre_activation(x3, x2, x1, x0, w0, w1, w2, w3, t, st0)
            dy = tl.load(
                dy_base + t.to(tl.int64) * C + c, mask=c_ok & (t >= 0) & (t < T), other=0.0
            )
            d0 = dy.to(tl.float32)
            if SILU:
                sig = tl.sigmoid(pre)
                d0 = d0 * sig * (1.0 + pre * (1.0 - sig))
            if i < BT:  # output row t is this program's: its dweight terms
                dw0 += tl.where(t - 3 >= st0, d0 * x3, 0.0)
                dw1 += tl.where(t - 2 >= st0, d0 * x2, 0.0)
                dw2 += tl.where(t - 1 >= st0, d0 * x1, 0.0)
                dw3 += d0 * x0
            # input row s = t - 3 is read by output rows s + d through tap 3 - d
            s = t - 3
            dx = tl.where(s >= st3, d3 * w3, 0.0)
            dx += tl.where(s >= st2, d2 * w2, 0.0)
            dx += tl.where(s >= st1, d1 * w1, 0.0)
            dx += tl.where(s >= st0, d0 * w0, 0.0)
            own = (i >= 3) & (i < BT + 3) & (s < T)
            tl.store(dx_ptr + b * T * C + s.to(tl.int64) * C + c, dx.to(dx_ptr.dtype.element_ty),
                     mask=c_ok & own & (s >= 0))  # fmt: skip
            if HAS_INIT:
                tl.store(dh_ptr + b * (W - 1) * C + (s + (W - 1)) * C + c, dx,
                         mask=c_ok & own & (s < 0))  # fmt: skip
            x3, x2, x1 = x2, x1, x0
            d3, d2, d1 = d2, d1, d0
            st3, st2, st1 = st2, st1, st0
    # padded tap jp is the weight's tap jp - (4 - W); the padding taps have no gradient
    part = dwp_ptr + (b * NBT + pid_t) * W * C
    if W >= 4:
        tl.store(part + (W - 4) * C + c, dw0, mask=c_ok)
    if W >= 3:
        tl.store(part + (W - 3) * C + c, dw1, mask=c_ok)
    if W >= 2:
        tl.store(part + (W - 2) * C + c, dw2, mask=c_ok)
    tl.store(part + (W - 1) * C + c, dw3, mask=c_ok)


class _CausalConv1dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_BTC, weight_CW, h_BWC, start_T, silu: bool):
        B, T, C = x_BTC.shape
        W = weight_CW.shape[1]
        y_BTC = torch.empty(
            (B, T, C), dtype=torch.promote_types(x_BTC.dtype, weight_CW.dtype), device=x_BTC.device
        )
        rolling = W <= 4
        BT, BC, warps = _blocks(x_BTC, C, backward=False, rolling=rolling)
        grid = (triton.cdiv(T, BT), triton.cdiv(C, BC), B)
        (_conv4_fwd_kernel if rolling else _conv_fwd_kernel)[grid](
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
        rolling = W <= 4
        BT, BC, warps = _blocks(x_BTC, C, backward=True, rolling=rolling)
        row0 = -(W - 1) if has_init else 0
        NBT = triton.cdiv(T - row0, BT)
        dx_BTC = torch.empty_like(x_BTC)
        dh_BWC = torch.empty((B, W - 1, C), dtype=torch.float32, device=x_BTC.device)
        dw_PWC = torch.empty((B * NBT, W, C), dtype=torch.float32, device=x_BTC.device)
        grid = (NBT, triton.cdiv(C, BC), B)
        (_conv4_bwd_kernel if rolling else _conv_bwd_kernel)[grid](
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
            start_T = doc_start_index(cu_seqlens, T).to(torch.int32)
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
