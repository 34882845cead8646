"""Single entry point for the Gated DeltaNet chunked recurrence, with backend dispatch."""

from __future__ import annotations

import re

import torch

from ..dispatch import triton_interpreting
from .chunk_torch import chunk_gated_delta_rule_torch
from .naive import naive_recurrent_gated_delta_rule

BACKENDS = ("auto", "torch", "naive", "triton", "fla")

# fla's chunked GDN backward returns wrong dg / dbeta on Hopper (sm_90) with Triton 3.4+ (a
# Triton miscompile; https://github.com/fla-org/flash-linear-attention/issues/640). The forward
# is unaffected. First Triton release we treat as good on Hopper:
_FLA_MIN_TRITON_ON_HOPPER = (3, 7, 1)


def _check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
) -> None:
    if q.dim() != 4:
        raise ValueError(f"q must be [B, T, H, K], got shape {tuple(q.shape)}")
    B, T, H, K = q.shape
    if k.shape != q.shape:
        raise ValueError(f"k must match q's shape {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.dim() != 4 or v.shape[:3] != (B, T, H):
        raise ValueError(f"v must be [B, T, H, V] = [{B}, {T}, {H}, V], got {tuple(v.shape)}")
    V = v.shape[-1]
    for name, x in (("g", g), ("beta", beta)):
        if x.shape != (B, T, H):
            raise ValueError(f"{name} must be [B, T, H] = [{B}, {T}, {H}], got {tuple(x.shape)}")
    if cu_seqlens is None:
        N = B
    else:
        if B != 1:
            raise ValueError(f"cu_seqlens packs sequences into one row: B must be 1, got {B}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError(
                f"cu_seqlens must be a 1-D tensor of N + 1 offsets, got {tuple(cu_seqlens.shape)}"
            )
        if cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype == torch.bool:
            raise ValueError(f"cu_seqlens must be an integer tensor, got {cu_seqlens.dtype}")
        offsets = cu_seqlens.tolist()
        if (
            offsets[0] != 0
            or offsets[-1] != T
            or any(b < a for a, b in zip(offsets[:-1], offsets[1:]))
        ):
            raise ValueError(
                f"cu_seqlens must be non-decreasing offsets from 0 to T={T}, got {offsets}"
            )
        N = len(offsets) - 1
    if initial_state is not None and initial_state.shape != (N, H, K, V):
        raise ValueError(
            f"initial_state must be [N, H, K, V] = [{N}, {H}, {K}, {V}], "
            f"got {tuple(initial_state.shape)}"
        )


# Our compiled Triton kernels are refused at K <= this with 16-bit inputs on CUDA (see
# _triton_refusal and docs/kernels.md, "Known faults").
_TRITON_16BIT_REFUSED_MAX_K = 32


def _triton_refusal(K: int, dtype: torch.dtype, on_cuda: bool) -> str | None:
    """Why our *compiled* Triton GDN kernels must not run this configuration, else None.

    16-bit inputs at K <= 32 on CUDA. Two faults on Hopper with Triton 3.6, neither visible in
    Triton's interpreter (tests/kernels/test_gdn_bounds.py runs every kernel under an
    out-of-bounds and race checker and finds none; the results match the float64 recurrence):

    * K = 16, bf16 (H200, 2026-12-04, tests/gpu/test_gdn_packed_fuzz_gpu.py): o rel. error 1.2,
      dk 3.5 at every packed layout; the ``tiny`` preset (16/32) hit an illegal address in the
      backward. float32 is right.
    * K = 32 / V = 64, bf16 (H100, tests/gpu/test_fp8.py, the plain bf16 reference model: 4 heads,
      2 x 128 tokens): "an illegal memory access" raised at a Triton launch in the GDN backward.

    Suspected cause (compiled for sm_90 offline, tools/kernel_resources.py): only at K <= 32
    (state tiles KP <= 32 rows) do the [KP, C] x [C, *] products of the state passes and of
    the reverse pass's right-hand sides (``_fwd_state_step``: ``tl.trans(k) @ udec``;
    ``_bwd_chain_step``: ``tl.trans(W) @ kdS``; ``_bwd_rhs_kernel``: ``tl.trans(qdec) @ do``,
    ``tl.trans(W) @ Mdo``) fall back from wgmma to mma.sync, at 8 warps on 16 / 32 rows, i.e.
    with warps replicated 2-8x, and the results (the loop-carried state) are written back to
    shared memory as the next product's operand; at K = 16 also wgmma with N = 8 per warpgroup
    in the bwd chunk kernel (dq, dk; Triton issue #7830: wrong results or a crash for 16-bit
    N = 8 on H100). float32 takes none of these paths (exact products on FMA units). At K = 64,
    96 and 128 every product runs on wgmma with tile shapes the passing H200 checks compiled too.
    ``GDN_TRITON_CFG=kp_min=64`` (pad the key dim of the tiles to 64: only such shapes) is the
    candidate fix, CPU-tested but not yet run on a GPU; tests/kernels/test_gdn_triton_gpu.py
    checks the kernels with and without it at the test_fp8 shape and at K = 16."""
    sixteen_bit = dtype in (torch.bfloat16, torch.float16)
    if on_cuda and sixteen_bit and K <= _TRITON_16BIT_REFUSED_MAX_K:
        cmp = f"{K} < 32" if K < 32 else f"{K} <= 32"
        return (
            f"our Triton GDN kernels are refused at key head dim {cmp} with {dtype} on CUDA "
            "(16-bit faults on Hopper: wrong results at K = 16, an illegal address at "
            "K = 32 / V = 64; docs/kernels.md, 'Known faults')"
        )
    return None


def _version_tuple(version: str) -> tuple[int, ...]:
    """'3.7.1+git1234' -> (3, 7, 1); non-numeric tails are dropped."""
    parts = []
    for piece in version.split(".")[:3]:
        m = re.match(r"\d+", piece)
        if m is None:
            break
        parts.append(int(m.group()))
    return tuple(parts)


def _check_fla_allowed(q: torch.Tensor) -> None:
    """Raise unless fla's chunked GDN is known to be correct for this device/Triton pair."""
    if not q.is_cuda:
        raise RuntimeError(
            f"backend='fla' needs CUDA tensors (got device {q.device}): it is only enabled where "
            "fla's chunked gated delta rule is known correct (see fla issue #640, "
            "https://github.com/fla-org/flash-linear-attention/issues/640); "
            "use backend='torch' instead."
        )
    try:
        import triton
    except ImportError as e:  # pragma: no cover - fla itself depends on triton
        raise RuntimeError("backend='fla' needs triton, which is not installed") from e
    triton_version = _version_tuple(triton.__version__)
    major, minor = torch.cuda.get_device_capability(q.device)
    if major == 9 and triton_version < _FLA_MIN_TRITON_ON_HOPPER:
        need = ".".join(map(str, _FLA_MIN_TRITON_ON_HOPPER))
        raise RuntimeError(
            f"backend='fla' is disabled on Hopper (sm_{major}{minor}) with triton "
            f"{triton.__version__}: fla's chunked gated delta rule backward returns wrong "
            f"dg/dbeta gradients there "
            f"(fla issue #640, https://github.com/fla-org/flash-linear-attention/issues/640). "
            f"Upgrade to triton >= {need} or use backend='torch'."
        )


def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    use_qk_l2norm_in_kernel: bool = False,
    backend: str = "auto",
    save_intermediates: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated delta rule over a whole sequence (the entry point the model calls).

    Per head: ``S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T`` and
    ``o_t = scale * S_t^T q_t``.

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``.
        g: ``[B, T, H]`` log decay (``<= 0``); beta: ``[B, T, H]``.
        scale: output scale, default ``K ** -0.5``.
        initial_state: ``[N, H, K, V]`` (float32) or None for zeros.
        output_final_state: also return the ``[N, H, K, V]`` float32 final state.
        cu_seqlens: int ``[N + 1]`` offsets of sequences packed into the time axis (``B == 1``);
            the state resets at every boundary. Without it ``N == B``.
        use_qk_l2norm_in_kernel: L2-normalise q and k per head inside the op.
        backend: ``"auto"``, ``"torch"`` (chunked PyTorch), ``"naive"`` (float64 reference),
            ``"triton"`` (ours: :mod:`.triton_chunk`; CUDA, or CPU with ``TRITON_INTERPRET=1``)
            or ``"fla"`` (flash-linear-attention). ``"auto"`` picks ``"triton"`` on CUDA (and on
            CPU under ``TRITON_INTERPRET=1``) when ``16 <= K, V <= 256`` (``K > 32`` for 16-bit
            inputs on CUDA: known faults, see ``_triton_refusal``), else ``"torch"``.
        save_intermediates: ``"triton"`` only (the others ignore it): keep the forward's chunk
            intermediates (W, u, per-chunk states) for the backward instead of recomputing them,
            for identical gradients. A speed-for-memory trade like activation recomputation in
            reverse: on the H200 at 4 x 8192 x 30 heads (96/192), fwd+bwd 7.84 vs 9.05 ms, for
            (C K + C V + K V) / (C V) = 2.9x a bf16 v's size more activation memory per GDN
            layer (1.1 GB per 32K tokens x 30 heads; C = 64).

    Returns:
        ``(o [B, T, H, V] in q.dtype, final_state or None)``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown GDN backend {backend!r}; valid backends: {', '.join(BACKENDS)}")
    _check_inputs(q, k, v, g, beta, initial_state, cu_seqlens)
    K, V = q.shape[-1], v.shape[-1]
    # Our compiled Triton kernels fault at K <= 32 with 16-bit inputs on CUDA (wrong results at
    # K = 16, an illegal address at K = 32 / V = 64; see _triton_refusal): never run them there.
    # "auto" takes the chunked torch path instead (right, slower); asking for them is an error.
    refusal = _triton_refusal(K, q.dtype, q.is_cuda)
    if backend == "auto":
        # ours on CUDA (and on CPU under Triton's interpreter, as CI tests it), else chunked torch
        fits = 16 <= K <= 256 and 16 <= V <= 256 and refusal is None
        backend = "triton" if fits and (q.is_cuda or triton_interpreting()) else "torch"
    elif backend == "triton" and refusal is not None:
        raise ValueError(f"{refusal}: use backend 'auto' or 'torch', float32, or K > 32")

    kwargs = dict(
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
        use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
    )
    if backend == "torch":
        return chunk_gated_delta_rule_torch(q, k, v, g, beta, **kwargs)
    if backend == "naive":
        return naive_recurrent_gated_delta_rule(q, k, v, g, beta, **kwargs)
    if backend == "triton":
        if not q.is_cuda and not triton_interpreting():
            raise NotImplementedError(
                f"backend='triton' needs CUDA tensors (got device {q.device}), or "
                "TRITON_INTERPRET=1 to run its kernels in Triton's (slow) CPU interpreter; "
                "use backend='torch' on CPU"
            )
        from .triton_chunk import chunk_gated_delta_rule_triton

        return chunk_gated_delta_rule_triton(
            q, k, v, g, beta, save_intermediates=save_intermediates, **kwargs
        )
    # backend == "fla"
    _check_fla_allowed(q)
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk_gated_delta_rule
    except ImportError as e:
        raise RuntimeError(
            "backend='fla' needs flash-linear-attention (`pip install flash-linear-attention`)"
        ) from e
    return fla_chunk_gated_delta_rule(q, k, v, g=g, beta=beta, **kwargs)
