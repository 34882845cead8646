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
            CPU under ``TRITON_INTERPRET=1``) when ``16 <= K, V <= 256`` (``K >= 32`` for 16-bit
            inputs on CUDA: a known fault), else ``"torch"``.
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
    # Our Triton kernels are wrong at K < 32 with 16-bit inputs on CUDA (H200, 2026-12-04:
    # o rel. error 1.2 at K = 16 bf16; fp32 and K >= 32 are right; docs/kernels.md): never
    # run them there. "auto" takes the chunked torch path instead; asking for them is an error.
    bad_triton = q.is_cuda and K < 32 and q.dtype in (torch.bfloat16, torch.float16)
    if backend == "auto":
        # ours on CUDA (and on CPU under Triton's interpreter, as CI tests it), else chunked torch
        fits = 16 <= K <= 256 and 16 <= V <= 256 and not bad_triton
        backend = "triton" if fits and (q.is_cuda or triton_interpreting()) else "torch"
    elif backend == "triton" and bad_triton:
        raise ValueError(
            f"the triton GDN backend is wrong at key head dim {K} < 32 with {q.dtype} on CUDA "
            "(a known fault, docs/kernels.md): use backend 'auto' or 'torch', fp32, or K >= 32"
        )

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
