"""Chunked Gated DeltaNet in Triton (forward and backward), deterministic by construction.

Same maths as :mod:`.chunk_torch` (read its docstring for the derivation). Per head, per chunk of
``C = 64`` tokens with entering state ``S`` [K, V], in-chunk cumulative log decay ``G``,
``Gam = exp(G)``, ``gam = exp(G_last)`` and ``D_tj = exp(G_t - G_j)`` (``j <= t``)::

    A   = strict_lower(diag(beta) (k k^T) * D)       Tinv = (I + A)^-1          (UT transform)
    W   = Tinv diag(beta Gam) k                       U    = Tinv diag(beta) v
    u   = U - W S                                     (the delta-rule updates "v_new")
    o   = diag(Gam) q S + ((q k^T) * D) u             (q pre-scaled)
    S'  = gam S + (k * gam / Gam)^T u

Backward (``dS'`` the gradient of the state leaving the chunk, ``dU' = Tinv^T du``)::

    du  = ((q k^T) * D)^T do + (k * gam / Gam) dS'
    dS  = gam dS' + (Gam q)^T do - W^T du                      (reverse pass over chunks)
        = gam dS' - Q dS' + (Gam q)^T do - W^T ((q k^T) * D)^T do,   Q = W^T (k * gam / Gam)
    dA  = -strict_lower(dU' u^T)  (because u = Tinv Y with Y = beta v - beta Gam k S)
    dv  = beta dU',  dq, dk, dbeta, dG from the chunk-local terms; dg = reverse cumsum of dG.

The second form of dS (``split_bwd``, the default for K <= 128) splits the reverse pass: the
chunk-local ``B = (Gam q)^T do - W^T (M^T do)`` (M = (q k^T) * D) is computed chunk-parallel
first, leaving one product, ``Q dS'``, on the serial chain instead of two (``kdec dS'`` then
``W^T du``); ``Q`` [K, K] per chunk comes from the backward's prep.

Kernels (in chunk_kernels/; grid in brackets; NC chunks over all sequences, N sequences, H heads):

* ``_l2norm_fwd_kernel`` / ``_l2norm_bwd_kernel`` [rows / 16]  the optional per-head L2 norm of
  q and k (the forward writes normalised q, k in the input dtype and keeps them with the float32
  rsqrt per row; the backward needs nothing else)
* ``_fwd_prep_kernel``   [NC, H]     G = cumsum(g), Tinv (recursive doubling), W and U; in the
  backward: reads G and Tinv, recomputes W, U and writes Q
* ``_fwd_state_kernel``  [V/BV, N*H] sequential over a sequence's chunks: S per chunk, u, final S
* ``_fwd_output_kernel`` [V/BV, NC, H] o
* ``_bwd_rhs_kernel``    [NC, H]     M^T do and B of one chunk (split_bwd)
* ``_bwd_chain_kernel``  [V/BV, N*H] reverse over chunks: dS' per chunk, du, d(initial state)
  (split_bwd; ``_bwd_state_kernel`` does the same from the inputs with two products per step)
* ``_bwd_chunk_kernel``  [NC, H]     dq, dk, dv, dbeta, dg of one chunk

Determinism: no atomics. Every output element is written by exactly one program, and every
reduction (over K, V, chunk rows, the in-chunk reverse cumsum for dg) runs in a fixed order
inside that program, so two runs with the same inputs are bitwise equal.

Sequences (rows of the batch, or ``cu_seqlens`` packs) are cut into chunks that never straddle a
sequence boundary; a sequence's last chunk may be short (masked loads, zeros beyond it). The
chunk-local intermediates are stored chunk-major and padded to ``C`` rows, where padding rows are
neutral (``g = beta = 0``, ``q = k = v = 0``).

The forward keeps the inputs plus ``G`` and ``Tinv`` (``[NC, H, C]`` float32, ``[NC, H, C, C]``
float32 with ``tinv_f32`` (the default), else in the buffer dtype: C / V or C / (2V) of a bf16 v's
size) for the backward, which recomputes ``W``, ``u`` and the per-chunk states from them (one
cheap prep pass and one forward state pass) rather than holding ``[NC, H, K, V]`` states between
forward and backward (``save_fwd`` holds them instead).

Block sizes, warps and the kernel variants are in ``_config`` (tuned on the H200; override with
``GDN_TRITON_CFG`` for tuning runs, see ``benchmarks/gdn_kernels.py --sweep``).
"""

# legend: T tokens (batch rows flattened: B * T_seq), H heads, K key dim, V value dim, C chunk,
#         NC chunks, N sequences, BK / BV blocks of K / V, KP / VP K / V padded to a power of 2

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import threading
from dataclasses import dataclass
from types import ModuleType, SimpleNamespace

import torch
import triton

CHUNK = 64

# triton.jit picks compiled kernels or the CPU interpreter when it decorates, i.e. at import. The
# kernels this module launches (``_K``, from the chunk_kernels package) were decorated in this
# mode; see _module_in_mode for the other one.
_INTERPRETED = bool(triton.knobs.runtime.interpret)

# dot-product modes (constexpr LOWP): operands kept float32 (exact "ieee" products), or cast to
# the 16-bit input dtype with float32 accumulation (tensor cores)
_DOT_F32, _DOT_BF16, _DOT_F16 = 0, 1, 2


def _dot_mode(dtype: torch.dtype) -> int:
    return {torch.bfloat16: _DOT_BF16, torch.float16: _DOT_F16}.get(dtype, _DOT_F32)


@contextlib.contextmanager
def _interpret_mode(on: bool):
    """Temporarily set TRITON_INTERPRET (and drop a knobs override) so triton.jit decorates in
    the requested mode."""
    runtime = triton.knobs.runtime
    saved_env = os.environ.get("TRITON_INTERPRET")
    saved_knob = runtime.__dict__.pop("interpret", None)
    os.environ["TRITON_INTERPRET"] = "1" if on else "0"
    try:
        yield
    finally:
        if saved_env is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved_env
        if saved_knob is not None:
            runtime.__dict__["interpret"] = saved_knob


_MODE_LOCK = threading.Lock()


def _module_in_mode(module: ModuleType, interpret: bool) -> ModuleType:
    """``module`` (a kernels module with an ``_INTERPRETED`` flag) if its kernels were decorated
    in the requested mode, else a cached copy of it executed again in that mode.

    CPU tensors run in Triton's interpreter and CUDA tensors on compiled kernels, whatever
    TRITON_INTERPRET was when the module was first imported; nested ``@triton.jit`` helpers
    resolve through the copy's own globals, so both modes can live in one process.
    """
    if module._INTERPRETED == interpret:
        return module
    base = module.__name__.removesuffix("__interpreted").removesuffix("__compiled")
    name = f"{base}__{'interpreted' if interpret else 'compiled'}"
    with _MODE_LOCK:
        copy = sys.modules.get(name)
        if copy is None:
            spec = importlib.util.spec_from_file_location(name, module.__file__)
            copy = importlib.util.module_from_spec(spec)
            sys.modules[name] = copy  # (dataclasses look their module up while executing)
            try:
                with _interpret_mode(interpret):
                    spec.loader.exec_module(copy)
            except BaseException:
                del sys.modules[name]
                raise
    return copy


_KERNEL_MODULES = ("common", "l2norm", "fwd", "bwd_state", "bwd_chunk")


def _kernel_package(interpret: bool) -> SimpleNamespace:
    """The ``*_kernel`` functions of the chunk_kernels package decorated in the requested mode:
    the package itself if it was imported in that mode, else a parallel copy of it
    (``chunk_kernels__interpreted`` / ``__compiled``, loaded from the same files), whose relative
    imports resolve to the copy's own modules."""
    parent = __name__.rsplit(".", 1)[0]
    pkg = f"{parent}.chunk_kernels"
    if importlib.import_module(f"{pkg}.common")._INTERPRETED != interpret:
        base = importlib.import_module(pkg)
        pkg = f"{pkg}__{'interpreted' if interpret else 'compiled'}"
        with _MODE_LOCK:
            if pkg not in sys.modules:
                spec = importlib.util.spec_from_file_location(
                    pkg, base.__file__, submodule_search_locations=list(base.__path__)
                )
                sys.modules[pkg] = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(sys.modules[pkg])
            with _interpret_mode(interpret):
                for name in _KERNEL_MODULES:
                    importlib.import_module(f"{pkg}.{name}")
    kernels = {}
    for name in _KERNEL_MODULES:
        mod = importlib.import_module(f"{pkg}.{name}")
        kernels.update({k: v for k, v in vars(mod).items() if k.endswith("_kernel")})
    return SimpleNamespace(**kernels)


_K = _kernel_package(_INTERPRETED)


# ----------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------


@dataclass
class _Layout:
    """Chunk tables: chunk c covers tokens chunk_tok0[c] .. + chunk_len[c] - 1; sequence s owns
    chunks seq_chunk0[s] .. + seq_nchunks[s] - 1 (int32 device tensors)."""

    chunk_tok0: torch.Tensor
    chunk_len: torch.Tensor
    seq_chunk0: torch.Tensor
    seq_nchunks: torch.Tensor
    seq_tok0: torch.Tensor
    seq_len: torch.Tensor
    n_chunks: int
    n_seqs: int


def _make_layout(offsets: list[int], device: torch.device) -> _Layout:
    tok0, lens, seq_chunk0, seq_nchunks = [], [], [], []
    for start, end in zip(offsets[:-1], offsets[1:]):
        seq_chunk0.append(len(tok0))
        for t in range(start, end, CHUNK):
            tok0.append(t)
            lens.append(min(CHUNK, end - t))
        seq_nchunks.append(len(tok0) - seq_chunk0[-1])
    seq_lens = [end - start for start, end in zip(offsets[:-1], offsets[1:])]
    table = torch.tensor([tok0, lens], dtype=torch.int32).reshape(2, -1).to(device)
    seqs = torch.tensor([seq_chunk0, seq_nchunks, offsets[:-1], seq_lens], dtype=torch.int32)
    seqs = seqs.to(device)
    return _Layout(*table, *seqs, n_chunks=len(tok0), n_seqs=len(seq_chunk0))


_LAYOUTS: dict[tuple, _Layout] = {}
_LAYOUTS_MAX = 64


def _layout(offsets: list[int], device: torch.device) -> _Layout:
    """_make_layout, cached: training sees the same few packings over and over, and building the
    tables is a Python loop over chunks plus two host-to-device copies per call."""
    key = (tuple(offsets), str(device))
    lay = _LAYOUTS.get(key)
    if lay is None:
        if len(_LAYOUTS) >= _LAYOUTS_MAX:
            _LAYOUTS.pop(next(iter(_LAYOUTS)))
        lay = _LAYOUTS[key] = _make_layout(offsets, device)
    return lay


def _pow2(x: int) -> int:
    return max(16, triton.next_power_of_2(x))


@dataclass
class _Config:
    """Block sizes and warps per kernel. The defaults were picked by the sweep in
    ``benchmarks/gdn_kernels.py --sweep`` on the H200 (see docs/kernels.md); any field can be
    overridden with ``GDN_TRITON_CFG="name=value,..."`` (for tuning runs)."""

    KP: int  # K padded (state kernels keep the whole K of a state slice in registers)
    BK: int  # K block of the chunk-parallel kernels
    BV: int  # V block of the prep and backward chunk kernels
    bv_out: int  # V slice of the output kernel
    bv_fstate: int  # V slice of the forward state pass (0: by occupancy, see _state_bv)
    bv_bstate: int  # V slice of the reverse state pass (0: by occupancy)
    bk_out: int = 0  # K block of the output kernel (0: BK)
    w_prep: int = 4
    w_fstate: int = 4
    w_out: int = 4
    w_bstate: int = 8
    w_bchunk: int = 8
    slots: int = 0  # programs per wave for the automatic state-pass V slices (0: see _state_bv)
    pf_fstate: int = 1  # one-chunk register prefetch in the forward state pass
    pipe_fstate: int = 0  # > 0: software-pipelined chunk loop of that many stages instead
    pipe_bstate: int = 0  # the same for the reverse chain (_bwd_chain_kernel; compiled only)
    split_bwd: int = 1  # reverse pass = _bwd_rhs_kernel + _bwd_chain_kernel, else _bwd_state_kernel
    chain_q: int = 0  # 1: the chain multiplies by Q = W^T kdec (built by the backward's prep),
    # else by W^T after kdec (two dependent products per step, no Q; faster on the H200 at both
    # head shapes, 9.05 vs 9.21 ms fwd+bwd at 4 x 8192 Olmo, 9.13 vs 9.36 at 32 x 128/128, and
    # 270-510 MiB less peak memory: writing and reading Q [K, K] per chunk costs more than the
    # second product saves)
    dot16_bstate: int = 1  # _bwd_state_kernel's products in the 16-bit input dtype (else float32)
    dot16_fstate: int = 1  # _fwd_state_kernel's products in the 16-bit input dtype (else float32)
    split_bchunk: int = 0  # bwd chunk work as three kernels, the middle one per K block
    w_bkb: int = 4  # _bwd_kblock_kernel (split_bchunk)
    bk_bkb: int = 32  # K block of _bwd_kblock_kernel (narrow: 154-174 registers at 4 warps, sm_90)
    w_rhs: int = 8  # _bwd_rhs_kernel
    bv_rhs: int = 64  # V block of _bwd_rhs_kernel
    stages: int = 3  # num_stages of the chunk-parallel kernels (prep, output, bwd chunk)
    save_fwd: int = 0  # keep the forward's W, u and per-chunk states for the backward instead of
    # recomputing them (skips a prep and a state pass, or the state pass alone with chain_q) for
    # (C K + C V + K V) / (C V) x a bf16 v's size more memory between forward and backward
    tinv_f32: int = 1  # save Tinv in float32 and put beta (Gam) on it instead of on v (k): one
    # 16-bit rounding less in W and U (o error 4.45e-3 -> 4.13e-3, fla's 4.45e-3, under
    # benchmarks/gdn_emulated_errors.py) for C / (2V) of v's size more memory; 0 = Tinv in the
    # buffer dtype (what the H200 measurements of 2026-11-29 ran)
    kp_min: int = 0  # pad the key dim of every tile to at least this (a power of 2; 0: no
    # padding beyond the next power of 2). kp_min=64 is the candidate fix, unverified on a GPU,
    # for the 16-bit faults at K <= 32 (docs/kernels.md, "Known faults"): K = 16 / 32 then
    # compiles to the tile shapes of K = 64 (state slices [64, BV] on wgmma instead of the
    # mma.sync fallback with replicated warps, K blocks of 32 / 64 instead of 16), the padding
    # masked. Set only through GDN_TRITON_CFG (it is read before the other fields are derived).


def _cfg_overrides() -> dict[str, int]:
    """GDN_TRITON_CFG="name=value,..." as a dict (unknown names are an error)."""
    out = {}
    for item in filter(None, os.environ.get("GDN_TRITON_CFG", "").split(",")):
        name, value = (x.strip() for x in item.split("="))
        if name not in _Config.__dataclass_fields__:
            raise ValueError(f"GDN_TRITON_CFG: unknown setting {name!r}")
        out[name] = int(value)
    return out


def _config(K: int, V: int, LOWP: int) -> _Config:
    overrides = _cfg_overrides()
    kp_min = overrides.pop("kp_min", 0)
    if kp_min & (kp_min - 1):
        raise ValueError(f"GDN_TRITON_CFG: kp_min must be a power of 2, got {kp_min}")
    KP, VP = max(_pow2(K), kp_min), _pow2(V)
    if KP <= 128:
        cfg = _Config(
            KP=KP, BK=min(KP, 64), BV=min(VP, 64), bv_out=min(VP, 128),
            bv_fstate=0, bv_bstate=0, w_fstate=8, w_out=8,
        )  # fmt: skip
        # the output kernel is cheaper on exact 32-wide K blocks than on 64-wide padded ones
        # (K = 96: 0.70 vs 1.07 ms at 4 x 8192 x 30 heads)
        cfg.bk_out = min(32, KP) if K % 64 else cfg.BK
        # likewise the bwd chunk work: where K is not a multiple of BK, the split kernels (K
        # blocks of bk_bkb = 32) beat the fused one (K padded to BK blocks): 9.42 vs 9.58 ms
        # fwd+bwd at 4 x 8192 x 30 heads, K = 96; at K = 128 the fused one wins (9.46 vs 9.65)
        cfg.split_bchunk = int(K % cfg.BK != 0)
        # the reverse chain software-pipelined over 2 stages: 1.18 vs 1.35 ms at 4 x 8192 x 30
        # heads, 96/192 (1.39 vs 1.35 at 32 heads 128/128: noise-level)
        cfg.pipe_bstate = 2
    else:  # K > 128: [K, K] tiles of Q and [K, 64] state slices would not fit in registers
        cfg = _Config(
            KP=KP, BK=64, BV=min(VP, 64), bv_out=min(VP, 64), bv_fstate=16, bv_bstate=32,
            w_fstate=8, w_out=8, pf_fstate=0, split_bchunk=1, dot16_bstate=0, dot16_fstate=0,
        )  # fmt: skip
        # The split reverse pass without Q, at 32-wide V slices, and the split bwd chunk kernels
        # compile without spills at 192/256 (the two-product `_bwd_state_kernel` spills 10.5 KB
        # there) and pass the H200 checks in bf16 and fp32 (2026-12-03).
        # dot16_fstate=0 (dot16_bstate=0 for split_bwd=0): with bf16 products the state passes
        # at [256, 16] slices fault with an illegal address on the H200 (Triton 3.6): the
        # two-product reverse kernel (2026-11-29), and the forward one once its k^T operand came
        # straight from a bf16 load (2026-12-03). float32 products at the same tiles run clean
        # and pass the reference checks, and the interpreter finds no bad index: a code
        # generation fault at these tiles. (8 warps: the float32 forward products spill 8.6 KB
        # at 4, 1.5 KB at 8.)
    if LOWP == _DOT_F32:
        # exact float32 dots run on FMA units with large register tiles: 8 warps, no prefetch or
        # pipelining (the float32 path is for checking, not speed; it spills at any setting)
        cfg.w_prep = cfg.w_fstate = cfg.w_out = cfg.w_bstate = cfg.w_bchunk = 8
        cfg.pf_fstate = cfg.bk_out = cfg.pipe_bstate = 0
    cfg.kp_min = kp_min
    for name, value in overrides.items():
        if LOWP == _DOT_F32 and name.startswith(("w_", "pf_")):
            continue  # the float32 path keeps its warps and prefetch
        setattr(cfg, name, value)
    return cfg


_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int | None:
    """Streaming multiprocessors of a CUDA device; None for the CPU (interpreter)."""
    if device.type != "cuda":
        return None
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def _state_bv(bv: int, V: int, n_rows: int, device: torch.device, slots: int, warps: int) -> int:
    """V slice of a state pass: ``bv`` if set, else 32 when that needs no more waves of programs
    than 64 does, else 64. ``slots`` is the number of programs per wave; by default the SM count
    times the programs an SM holds at once, which the registers decide: ~160-230 per thread at
    these tiles (offline sm_90 compiles), so one program of 8 warps or two of 4 per SM. The
    passes are serial over chunks, so a narrower slice is faster per program (H200, 1 x 32768 x
    32 heads x 128/128: 64 programs of 64 -> 128 of 32 took the two passes from 6.1 to 4.7 ms)
    but not once it adds a wave (30 heads x 192 at 8 warps: 90 -> 180 programs, 4.5 -> 9.0 ms)."""
    if bv:
        return bv
    sms = _sm_count(device)
    if sms is None:
        return min(64, _pow2(V))
    slots = slots or sms * max(1, 8 // warps)
    waves = {cand: triton.cdiv(triton.cdiv(V, cand) * n_rows, slots) for cand in (32, 64)}
    return min(32 if waves[32] <= waves[64] else 64, _pow2(V))


def _buffer_dtype(x: torch.Tensor, LOWP: int) -> torch.dtype:
    """Intermediates (W, u, per-chunk states and their gradients; Tinv unless tinv_f32) are only
    ever matmul operands, which LOWP casts to 16 bits anyway: store them in 16 bits then (half
    the memory traffic), in float32 otherwise. G stays float32 and running states stay in registers."""
    return {_DOT_BF16: torch.bfloat16, _DOT_F16: torch.float16}.get(LOWP, torch.float32)


def _prep(k, v, g, beta, lay: _Layout, cfg: _Config, LOWP: int, G=None, Tinv=None, store_q=False):
    """Chunk-local prep. G and Tinv are computed unless given (the backward passes the
    forward's). Returns (G, Tinv, W, u, Q or None)."""
    T, H, K = k.shape
    V = v.shape[-1]
    NC, C = lay.n_chunks, CHUNK
    dev = k.device
    f32 = torch.float32
    idt = _buffer_dtype(k, LOWP)
    have_tinv = Tinv is not None
    if not have_tinv:
        G = torch.empty(NC, H, C, device=dev, dtype=f32)
        # tinv_f32: float32, not the buffer dtype, since the prep scales it by beta (Gam) before
        # rounding it to a 16-bit product operand
        Tinv = torch.empty(NC, H, C, C, device=dev, dtype=f32 if cfg.tinv_f32 else idt)
    W = torch.empty(NC, H, C, K, device=dev, dtype=idt)
    u = torch.empty(NC, H, C, V, device=dev, dtype=idt)
    Q = torch.empty(NC, H, K, K, device=dev, dtype=idt) if store_q else None
    if NC > 0:
        _K._fwd_prep_kernel[(NC, H)](
            k, v, g, beta, G, Tinv, W, u, W if Q is None else Q, lay.chunk_tok0, lay.chunk_len,
            H=H, K=K, V=V, C=C, LOG2C=CHUNK.bit_length() - 1, BK=cfg.BK, BV=cfg.BV,
            HAVE_TINV=have_tinv, STORE_Q=store_q, TINV_F32=bool(cfg.tinv_f32), LOWP=LOWP,
            num_warps=cfg.w_prep,
            num_stages=cfg.stages,
        )  # fmt: skip
    return G, Tinv, W, u, Q


def _fwd_states(k, G, W, u, h0, lay: _Layout, cfg: _Config, LOWP: int):
    """Forward state pass: (the state entering every chunk [NC, H, K, V], final states)."""
    T, H, K = k.shape
    V = u.shape[-1]
    NC, N, C = lay.n_chunks, lay.n_seqs, CHUNK
    dev = k.device
    states = torch.empty(NC, H, K, V, device=dev, dtype=W.dtype)
    ht = torch.empty(N, H, K, V, device=dev, dtype=torch.float32)
    if N > 0:
        bv = _state_bv(cfg.bv_fstate, V, N * H, dev, cfg.slots, cfg.w_fstate)
        _K._fwd_state_kernel[(triton.cdiv(V, bv), N * H)](
            k, G, W, u, h0 if h0 is not None else ht, states, ht,
            lay.seq_chunk0, lay.seq_nchunks, lay.seq_tok0, lay.seq_len,
            H=H, K=K, V=V, C=C, KP=cfg.KP, BV=bv, HAS_H0=h0 is not None,
            PREFETCH=bool(cfg.pf_fstate), PIPE=cfg.pipe_fstate,
            LOWP=LOWP if cfg.dot16_fstate else _DOT_F32, num_warps=cfg.w_fstate,
        )  # fmt: skip
    return states, ht


def _forward(q, k, v, g, beta, h0, scale, lay: _Layout, LOWP: int, save: bool = False):
    """Returns (o, final_state, G, Tinv, (W, u, states) if save or save_fwd else None); G,
    Tinv and those are kept for the backward."""
    T, H, K = q.shape
    V = v.shape[-1]
    cfg = _config(K, V, LOWP)
    G, Tinv, W, u, _ = _prep(k, v, g, beta, lay, cfg, LOWP)
    states, ht = _fwd_states(k, G, W, u, h0, lay, cfg, LOWP)
    o = torch.empty(T, H, V, device=q.device, dtype=q.dtype)
    if lay.n_chunks > 0:
        _K._fwd_output_kernel[(triton.cdiv(V, cfg.bv_out), lay.n_chunks, H)](
            q, k, G, u, states, o, lay.chunk_tok0, lay.chunk_len, scale,
            H=H, K=K, V=V, C=CHUNK, BK=cfg.bk_out or cfg.BK, BV=cfg.bv_out, LOWP=LOWP,
            num_warps=cfg.w_out,
            num_stages=cfg.stages,
        )  # fmt: skip
    return o, ht, G, Tinv, ((W, u, states) if save or cfg.save_fwd else None)


def _backward(
    q, k, v, g, beta, h0, G, Tinv, scale, lay: _Layout, do, dht, LOWP: int, dqk_dtype, saved=None
):
    """``saved``: the forward's (W, u, states) (save_fwd), else they are recomputed."""
    T, H, K = q.shape
    V = v.shape[-1]
    NC, N, C = lay.n_chunks, lay.n_seqs, CHUNK
    cfg = _config(K, V, LOWP)
    split = bool(cfg.split_bwd)
    need_q = split and bool(cfg.chain_q)
    if saved is None:
        G, Tinv, W, u, Q = _prep(k, v, g, beta, lay, cfg, LOWP, G, Tinv, store_q=need_q)
        states, _ = _fwd_states(k, G, W, u, h0, lay, cfg, LOWP)
    else:
        W, u, states = saved
        # the prep's recompute still builds Q (its W and u come out bitwise equal to these)
        Q = _prep(k, v, g, beta, lay, cfg, LOWP, G, Tinv, store_q=True)[4] if need_q else None
    dev = q.device
    idt = _buffer_dtype(q, LOWP)
    dstates = torch.empty(NC, H, K, V, device=dev, dtype=idt)
    du = torch.empty(NC, H, C, V, device=dev, dtype=idt)
    dh0 = torch.empty(N, H, K, V, device=dev, dtype=torch.float32)
    dq = torch.empty(q.shape, device=dev, dtype=dqk_dtype)
    dk = torch.empty(k.shape, device=dev, dtype=dqk_dtype)
    dv = torch.empty_like(v)
    dg, dbeta = torch.empty_like(g), torch.empty_like(beta)
    if N > 0:
        bv = _state_bv(cfg.bv_bstate, V, N * H, dev, cfg.slots, cfg.w_bstate)
        grid = (triton.cdiv(V, bv), N * H)
        dht_or_any = dht if dht is not None else dh0
    if split and N > 0:
        if NC > 0:  # M^T do into du, B into dstates (chunk-parallel)
            _K._bwd_rhs_kernel[(NC, H)](
                q, k, do, G, W, du, dstates, lay.chunk_tok0, lay.chunk_len, scale,
                H=H, K=K, V=V, C=C, KP=cfg.KP, BV=cfg.bv_rhs, LOWP=LOWP, num_warps=cfg.w_rhs,
            )  # fmt: skip
        _K._bwd_chain_kernel[grid](
            k, G, Q if cfg.chain_q else W, dht_or_any, dstates, du, dh0,
            lay.seq_chunk0, lay.seq_nchunks, lay.seq_tok0, lay.seq_len,
            H=H, K=K, V=V, C=C, KP=cfg.KP, BV=bv, HAS_DHT=dht is not None,
            PIPE=cfg.pipe_bstate, CHAIN_Q=bool(cfg.chain_q), LOWP=LOWP, num_warps=cfg.w_bstate,
        )  # fmt: skip
    elif N > 0:
        _K._bwd_state_kernel[grid](
            q, k, G, W, do, dht_or_any, dstates, du, dh0,
            lay.seq_chunk0, lay.seq_nchunks, lay.seq_tok0, lay.seq_len, scale,
            H=H, K=K, V=V, C=C, KP=cfg.KP, BV=bv, HAS_DHT=dht is not None,
            LOWP=LOWP if cfg.dot16_bstate else _DOT_F32, num_warps=cfg.w_bstate,
        )  # fmt: skip
    if NC > 0 and cfg.split_bchunk:
        _bwd_chunk_split(q, k, v, beta, do, G, Tinv, u, states, dstates, du, dq, dk, dv, dbeta,
                         dg, lay, scale, cfg, LOWP)  # fmt: skip
    elif NC > 0:
        _K._bwd_chunk_kernel[(NC, H)](
            q, k, v, beta, do, G, Tinv, u, states, dstates, du,
            dq, dk, dv, dbeta, dg, lay.chunk_tok0, lay.chunk_len, scale,
            H=H, K=K, V=V, C=C, BK=cfg.BK, BV=cfg.BV, LOWP=LOWP, num_warps=cfg.w_bchunk,
            num_stages=cfg.stages,
        )  # fmt: skip
    return dq, dk, dv, dg, dbeta, dh0


def _bwd_chunk_split(q, k, v, beta, do, G, Tinv, u, states, dstates, du, dq, dk, dv, dbeta, dg,
                     lay: _Layout, scale, cfg: _Config, LOWP: int):  # fmt: skip
    """The bwd chunk kernel's work as three kernels (``split_bchunk``), see _bwd_local."""
    T, H, K = q.shape
    V = v.shape[-1]
    NC, C = lay.n_chunks, CHUNK
    BKB = cfg.bk_bkb or cfg.BK
    NKB = triton.cdiv(K, BKB)
    dev = q.device
    f32 = torch.float32
    dP = torch.empty(NC, H, C, C, device=dev, dtype=_buffer_dtype(q, LOWP))
    dB = torch.empty_like(dP)
    part = torch.empty(NC, H, 2, C, device=dev, dtype=f32)
    rows = torch.empty(NKB, NC, H, 4, C, device=dev, dtype=f32)
    meta = dict(H=H, K=K, V=V, C=C, BK=cfg.BK, BV=cfg.BV, LOWP=LOWP)
    _K._bwd_local_kernel[(NC, H)](
        q, k, v, beta, do, G, Tinv, u, du, dv, dP, dB, part, lay.chunk_tok0, lay.chunk_len,
        scale, **meta, num_warps=cfg.w_bchunk, num_stages=cfg.stages,
    )  # fmt: skip
    _K._bwd_kblock_kernel[(NKB, NC, H)](
        q, k, beta, do, G, u, du, states, dstates, dP, dB, dq, dk, rows,
        lay.chunk_tok0, lay.chunk_len, NC, scale, **{**meta, "BK": BKB}, num_warps=cfg.w_bkb,
        num_stages=cfg.stages,
    )  # fmt: skip
    _K._bwd_finish_kernel[(NC, H)](
        beta, G, part, rows, dbeta, dg, lay.chunk_tok0, lay.chunk_len, NC, NKB, H=H, C=C,
        num_warps=2,
    )  # fmt: skip


_L2_ROWS = 16  # rows per program of the l2norm kernels


def _l2norm_fwd(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head ``x * rsqrt(sum(x^2) + 1e-6)`` (float32 maths) in x's dtype, and the float32
    rsqrt per row."""
    D = x.shape[-1]
    R = x.numel() // D
    y = torch.empty_like(x)
    rstd = torch.empty(x.shape[:-1], device=x.device, dtype=torch.float32)
    if R > 0:
        _K._l2norm_fwd_kernel[(triton.cdiv(R, _L2_ROWS),)](
            x, y, rstd, R, D=D, DP=_pow2(D), BR=_L2_ROWS, num_warps=4
        )
    return y, rstd


def _l2norm_bwd(y: torch.Tensor, rstd: torch.Tensor, dy: torch.Tensor, dtype) -> torch.Tensor:
    D = y.shape[-1]
    R = y.numel() // D
    dx = torch.empty(y.shape, device=y.device, dtype=dtype)
    if R > 0:
        _K._l2norm_bwd_kernel[(triton.cdiv(R, _L2_ROWS),)](
            y, rstd, dy, dx, R, D=D, DP=_pow2(D), BR=_L2_ROWS, num_warps=4
        )
    return dx


class _ChunkGatedDeltaRule(torch.autograd.Function):
    """Autograd wrapper over the token-major kernels ([T, H, *] inputs, batch rows flattened).

    With L2 the per-head L2 norm of q and k is part of the op: the forward normalises them into
    fresh tensors of the input dtype (what the chunk kernels read) and keeps those with their
    float32 rsqrt instead of the raw q, k (same memory; the backward needs nothing else), the
    backward has the chunk kernels write dq, dk in float32 and applies the norm's backward in
    one more kernel. Also saved: G and Tinv (``[NC, H, C]`` float32 and ``[NC, H, C, C]`` in the
    buffer dtype or float32, ~C / (2 V) or C / V of a bf16 v's size), so the backward's recompute
    skips the UT inverse; with ``save_fwd`` also W, u and the per-chunk states, so that it skips
    the recompute."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, h0, scale, lay, LOWP, L2, SAVE):
        if L2:
            (q, rq), (k, rk) = _l2norm_fwd(q), _l2norm_fwd(k)
        o, ht, G, Tinv, saved = _forward(q, k, v, g, beta, h0, scale, lay, LOWP, SAVE)
        rstd = (rq, rk) if L2 else ()
        ctx.save_for_backward(q, k, v, g, beta, h0, G, Tinv, *rstd, *(saved or ()))
        ctx.scale, ctx.lay, ctx.LOWP, ctx.L2 = scale, lay, LOWP, L2
        ctx.n_rstd, ctx.saved_fwd = len(rstd), saved is not None
        ctx.set_materialize_grads(False)
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, beta, h0, G, Tinv, *rest = ctx.saved_tensors
        rstd, saved = rest[: ctx.n_rstd], (tuple(rest[ctx.n_rstd :]) if ctx.saved_fwd else None)
        L2 = ctx.L2
        do = torch.zeros(v.shape, device=v.device, dtype=q.dtype) if do is None else do.contiguous()
        dht = None if dht is None else dht.contiguous()
        # float32 dq, dk ahead of the norm's backward, which subtracts their projection on q, k
        dqk_dtype = torch.float32 if L2 else q.dtype
        dq, dk, dv, dg, dbeta, dh0 = _backward(
            q, k, v, g, beta, h0, G, Tinv, ctx.scale, ctx.lay, do, dht, ctx.LOWP, dqk_dtype, saved
        )
        if L2:
            dq = _l2norm_bwd(q, rstd[0], dq, q.dtype)
            dk = _l2norm_bwd(k, rstd[1], dk, k.dtype)
        dh0 = None if h0 is None else dh0.to(h0.dtype)
        return dq, dk, dv, dg, dbeta, dh0, None, None, None, None, None


def chunk_gated_delta_rule_triton(
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
    save_intermediates: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked gated delta rule on our Triton kernels (inputs validated by :mod:`.api`).

    CUDA tensors run compiled kernels; CPU tensors run the same kernels in Triton's interpreter
    (slow; for tests). ``save_intermediates``: keep the forward's W, u and per-chunk states for
    the backward instead of recomputing them (the ``save_fwd`` setting; same gradients bitwise).

    Returns ``(o [B, T, H, V] in q.dtype, final_state [N, H, K, V] float32 or None)``.
    """
    impl = _module_in_mode(sys.modules[__name__], interpret=not q.is_cuda)
    return impl._chunk_gated_delta_rule(
        q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
        use_qk_l2norm_in_kernel, save_intermediates,
    )  # fmt: skip


def _chunk_gated_delta_rule(
    q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, use_qk_l2norm_in_kernel,
    save_intermediates=False,
):  # fmt: skip
    B, T, H, K = q.shape
    V = v.shape[-1]
    if not (16 <= K <= 256 and 16 <= V <= 256):
        raise ValueError(f"triton GDN kernels support 16 <= K, V <= 256, got K={K}, V={V}")
    if scale is None:
        scale = K**-0.5
    if cu_seqlens is None:
        offsets = [b * T for b in range(B + 1)]
    else:
        offsets = [int(x) for x in cu_seqlens.tolist()]
    lay = _layout(offsets, q.device)
    h0 = None if initial_state is None else initial_state.contiguous()
    o, ht = _ChunkGatedDeltaRule.apply(
        q.reshape(B * T, H, K).contiguous(),
        k.reshape(B * T, H, K).contiguous(),
        v.reshape(B * T, H, V).contiguous(),
        g.reshape(B * T, H).contiguous(),
        beta.reshape(B * T, H).contiguous(),
        h0,
        float(scale),
        lay,
        _dot_mode(q.dtype),
        bool(use_qk_l2norm_in_kernel),
        bool(save_intermediates),
    )
    return o.reshape(B, T, H, V), (ht if output_final_state else None)
