"""Out-of-bounds and race detector for our Triton GDN kernels, run through Triton's CPU interpreter.

An illegal address on the GPU is an unmasked load or store outside the tensor it belongs to. The
interpreter executes every ``tl.load`` / ``tl.store`` as numpy arrays of raw addresses, so
:class:`TritonMemoryChecker` wraps those two builder calls (``InterpreterBuilder.create_masked_load``
and ``create_masked_store``; plain and block-pointer loads go through them too) and, for every
launch, knows the byte range of each tensor argument of the kernel. Each access is checked:

* every unmasked address lies inside one argument's *view* (not just its storage: the inputs here
  are views in the middle of larger buffers), aligned, with the pointer's element type equal to
  that tensor's dtype; out-of-range lanes are masked off before the interpreter touches memory,
  so a bad kernel is reported instead of crashing the process;
* no element is written by one program and read or written by another program of the same launch
  (the interpreter runs programs one after the other; on the GPU they run at once, so such an
  access is a race).

Two more layers, independent of the checker: every input is a view in the middle of a buffer
whose guard regions hold NaN, and every buffer the host code allocates with ``torch.empty`` /
``torch.empty_like`` during the call is NaN-filled and guarded the same way (the CPU analogue of
the GPU tests' poisoned allocator). After forward + backward the guards must still be NaN bit
for bit, and the outputs and gradients finite (an unwritten output element or a read of an
unwritten intermediate shows as NaN) and close to the float64 recurrence.

The configuration matches the GPU's: ``_sm_count`` reports an H100's 132 SMs, so the state passes
take the V slices the GPU would (``_state_bv``: 32 at small sizes; without a device the host code
picks 64). The software-pipelined chain loop (``pipe_bstate``, compiled only) runs as the
interpreter's while loop, which visits the same chunks in the same order.

The test runs a seeded subset (incl. the test_fp8 reference model's shape: B 2 x T 128, 4 heads,
K 32 / V 64, bf16, g float32, l2norm in the op) and a self-test on a deliberately broken kernel.
The full sweep (K 16..128, V 32..192, H 1..4, T 1..200, batch 1..3, packed documents incl. empty
and one-token ones, fp32 / bf16, initial / final state, GPU-like and interpreter V slices, a few
kernel settings), ~3 s a case on one core:

    .venv/bin/python tests/kernels/test_gdn_bounds.py --cases 200 --seed 0
    (or GDN_BOUNDS_CASES=200 pytest -q tests/kernels/test_gdn_bounds.py -k sweep)
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

try:
    import kernels  # noqa: F401
except ImportError:  # run from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np
import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402
from triton.runtime import interpreter as _interp  # noqa: E402

from kernels.gdn import triton_chunk  # noqa: E402
from kernels.gdn.naive import naive_recurrent_gated_delta_rule  # noqa: E402

H100_SMS = 132

# ----------------------------------------------------------------------------------------------
# the checker
# ----------------------------------------------------------------------------------------------


@dataclass
class _Range:
    lo: int
    hi: int  # exclusive, bytes
    elsize: int
    names: list[str] = field(default_factory=list)
    dtypes: set[str] = field(default_factory=set)
    writer: np.ndarray | None = None  # per element: program that wrote it in this launch, or -1
    reader: np.ndarray | None = None  # program that read it, -1 none, -2 several


def _tensor_extent(t: torch.Tensor) -> int:
    """Bytes from t.data_ptr() to one past its last element (0 if empty)."""
    if t.numel() == 0:
        return 0
    last = sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    return (last + 1) * t.element_size()


def _tl_name(t: torch.Tensor) -> str:
    return str(tl.str_to_ty(triton.runtime.jit.mangle_type(t), None).element_ty)


class TritonMemoryChecker:
    """While active, checks every load and store the Triton interpreter executes (see the module
    docstring). ``violations`` collects one line per bad access (up to ``max_reports``);
    ``launches`` counts launches per kernel name."""

    def __init__(self, max_reports: int = 20, races: bool = True):
        self.violations: list[str] = []
        self.n_violations = 0
        self.max_reports = max_reports
        self.races = races
        self.launches: dict[str, int] = {}
        self._kernel: str | None = None
        self._ranges: list[_Range] = []
        self._saved = None

    # -- patching -------------------------------------------------------------------------------
    def __enter__(self):
        B, G = _interp.InterpreterBuilder, _interp.GridExecutor
        self._saved = (B.create_masked_load, B.create_masked_store, G.__call__)
        orig_load, orig_store, orig_call = self._saved
        checker = self

        def create_masked_load(builder, ptrs, mask, other, *rest):
            mask = checker._access("load", builder, ptrs, mask)
            return orig_load(builder, ptrs, mask, other, *rest)

        def create_masked_store(builder, ptrs, value, mask, *rest):
            mask = checker._access("store", builder, ptrs, mask)
            return orig_store(builder, ptrs, value, mask, *rest)

        def grid_call(executor, *args, **kwargs):
            checker._begin(executor.fn, args, kwargs)
            try:
                return orig_call(executor, *args, **kwargs)
            finally:
                checker._kernel, checker._ranges = None, []

        B.create_masked_load, B.create_masked_store = create_masked_load, create_masked_store
        G.__call__ = grid_call
        return self

    def __exit__(self, *exc):
        B, G = _interp.InterpreterBuilder, _interp.GridExecutor
        B.create_masked_load, B.create_masked_store, G.__call__ = self._saved
        return False

    # -- per launch -----------------------------------------------------------------------------
    def _begin(self, fn, args, kwargs):
        names = inspect.getfullargspec(fn).args
        bound = dict(zip(names, args))
        bound.update({k: v for k, v in kwargs.items() if k in names})
        ranges: dict[tuple[int, int], _Range] = {}
        for name, arg in bound.items():
            t = getattr(arg, "base", arg)  # TensorWrapper
            if not isinstance(t, torch.Tensor):
                continue
            lo = t.data_ptr()
            hi = lo + _tensor_extent(t)
            r = ranges.setdefault((lo, hi), _Range(lo, hi, t.element_size()))
            r.names.append(name)
            r.dtypes.add(_tl_name(t))
        self._kernel = fn.__name__
        self._ranges = sorted((r for r in ranges.values() if r.hi > r.lo), key=lambda r: r.lo)
        self.launches[self._kernel] = self.launches.get(self._kernel, 0) + 1

    def _report(self, msg: str) -> None:
        self.n_violations += 1
        if len(self.violations) < self.max_reports:
            self.violations.append(f"{self._kernel} {msg} at {_kernel_source_line()}")

    def _access(self, kind: str, builder, ptrs, mask):
        if self._kernel is None:  # a launch that did not go through GridExecutor
            return mask
        p = ptrs.data
        m = np.broadcast_to(mask.data, p.shape).astype(bool)
        if not m.any():
            return mask
        ety = ptrs.get_element_ty()
        es = max(1, ety.primitive_bitwidth // 8)
        addr = p[m].astype(np.uint64)
        los = np.array([r.lo for r in self._ranges], dtype=np.uint64)
        his = np.array([r.hi for r in self._ranges], dtype=np.uint64)
        idx = np.searchsorted(los, addr, side="right").astype(np.int64) - 1
        ok = idx >= 0
        ok[ok] &= addr[ok] + np.uint64(es) <= his[idx[ok]]
        gidx = builder.grid_idx
        where = f"{kind} program {gidx}"
        if not ok.all():
            bad = addr[~ok]
            self._report(
                f"{where}: {bad.size}/{addr.size} unmasked lanes outside every tensor argument "
                f"({_describe(bad[0], self._ranges)})"
            )
            m = m.copy()
            m[m] = ok  # mask the bad lanes off: report, don't crash
            addr, idx = addr[ok], idx[ok]
            mask = _interp.TensorHandle(m, mask.dtype)
        if addr.size == 0:
            return mask
        used = np.unique(idx)
        if used.size > 1:
            self._report(f"{where}: one access spans {[self._ranges[i].names for i in used]}")
        pid = (gidx[0] * builder.grid_dim[1] + gidx[1]) * builder.grid_dim[2] + gidx[2]
        for i in used:
            r = self._ranges[i]
            a = addr[idx == i] - np.uint64(r.lo)
            if str(ety) not in r.dtypes:
                self._report(f"{where}: {ety} pointer into {r.names} ({sorted(r.dtypes)})")
            if (a % np.uint64(r.elsize)).any() or es != r.elsize:
                self._report(f"{where}: misaligned / wrong-width access into {r.names}")
                continue
            if self.races:
                self._track(kind, where, r, (a // np.uint64(r.elsize)).astype(np.int64), pid)
        return mask

    def _track(self, kind, where, r: _Range, e: np.ndarray, pid: int) -> None:
        n = (r.hi - r.lo) // r.elsize
        if r.writer is None:
            r.writer = np.full(n, -1, dtype=np.int64)
            r.reader = np.full(n, -1, dtype=np.int64)
        w = r.writer[e]
        if ((w >= 0) & (w != pid)).any():
            other = int(w[(w >= 0) & (w != pid)][0])
            what = "reads" if kind == "load" else "overwrites"
            self._report(f"{where}: {what} {r.names} written by program #{other} (race)")
        if kind == "load":
            rd = r.reader[e]
            r.reader[e] = np.where((rd == -1) | (rd == pid), pid, -2)
        else:
            rd = r.reader[e]
            if ((rd != -1) & (rd != pid)).any():
                self._report(f"{where}: writes {r.names} read by another program (race)")
            r.writer[e] = pid


def _describe(a, ranges: list[_Range]) -> str:
    """Where a bad address lies relative to the nearest argument, in its elements."""
    best = min(ranges, key=lambda r: min(abs(int(a) - r.lo), abs(int(a) - r.hi)), default=None)
    if best is None:
        return f"address {int(a):#x}, no tensor arguments"
    off = (int(a) - best.lo) / best.elsize
    return f"element {off:g} of {best.names}, which has {(best.hi - best.lo) // best.elsize}"


def _kernel_source_line() -> str:
    """file:line of the innermost frame outside triton and the checker (the kernel code)."""
    f = sys._getframe(1)
    here = os.path.abspath(__file__)
    ours = {"_report", "_access", "_track", "create_masked_load", "create_masked_store"}
    while f is not None:
        fn = os.path.abspath(f.f_code.co_filename)
        mine = fn == here and f.f_code.co_name in ours
        if not mine and f"{os.sep}triton{os.sep}" not in fn:
            return f"{os.path.relpath(fn)}:{f.f_lineno}"
        f = f.f_back
    return "?"


# ----------------------------------------------------------------------------------------------
# guarded tensors
# ----------------------------------------------------------------------------------------------

GUARD = 97  # default elements of guard each side (odd: views are not 16-byte aligned either)


def _poison(dtype: torch.dtype) -> float:
    return float("nan") if dtype.is_floating_point else -(2**30) + 7


class Guards:
    """Views in the middle of guard-padded buffers; ``check()`` lists guards that changed."""

    def __init__(self, pad: int = GUARD):
        self.pad = pad
        self.bufs: list[tuple[str, torch.Tensor, torch.Tensor]] = []

    def new(self, name: str, shape, dtype, device="cpu", empty=torch.empty) -> torch.Tensor:
        n, pad = math.prod(shape), self.pad
        buf = empty(n + 2 * pad, dtype=dtype, device=device)
        buf.fill_(_poison(dtype))
        self.bufs.append((name, buf, buf.clone()))
        return buf[pad : pad + n].view(shape)

    def wrap(self, name: str, x: torch.Tensor) -> torch.Tensor:
        y = self.new(name, x.shape, x.dtype, x.device)
        y.copy_(x)
        return y

    def check(self) -> list[str]:
        bad = []
        for name, buf, ref in self.bufs:
            for part in (slice(0, self.pad), slice(buf.numel() - self.pad, None)):
                a = buf[part].view(torch.uint8 if buf.element_size() == 1 else buf.dtype)
                b = ref[part].view(a.dtype)
                if a.element_size() > 1:  # compare bits (NaN != NaN)
                    a = a.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()])
                    b = b.view(a.dtype)
                if not torch.equal(a, b):
                    bad.append(f"guard of {name} written")
        return bad


@contextlib.contextmanager
def poisoned_empty(guards: Guards):
    """torch.empty / torch.empty_like return NaN-filled views in guarded buffers (contiguous
    results only; others are just NaN-filled)."""
    orig_empty, orig_like = torch.empty, torch.empty_like
    count = [0]

    def guarded(t: torch.Tensor) -> torch.Tensor:
        count[0] += 1
        if not t.is_contiguous():
            return t.fill_(_poison(t.dtype))
        return guards.new(f"empty#{count[0]}{tuple(t.shape)}", t.shape, t.dtype, t.device,
                          empty=orig_empty)  # fmt: skip

    def empty(*a, **kw):
        return guarded(orig_empty(*a, **kw))

    def empty_like(*a, **kw):
        return guarded(orig_like(*a, **kw))

    torch.empty, torch.empty_like = empty, empty_like
    try:
        yield
    finally:
        torch.empty, torch.empty_like = orig_empty, orig_like


# ----------------------------------------------------------------------------------------------
# the GDN case
# ----------------------------------------------------------------------------------------------


@dataclass
class Case:
    B: int
    T: int
    H: int
    K: int
    V: int
    dtype: torch.dtype = torch.float32
    lens: list[int] | None = None  # packed documents (cu_seqlens; B must be 1)
    h0: bool = False
    final: bool = False
    l2: bool = True
    g_f32: bool = True  # g stays float32 with 16-bit q/k/v (what the model passes)
    sms: int | None = H100_SMS  # None: the interpreter's own V slices
    cfg: str = ""  # GDN_TRITON_CFG
    seed: int = 0

    def __str__(self):
        dt = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]
        s = f"B{self.B} T{self.T} H{self.H} K{self.K} V{self.V} {dt}"
        if self.lens is not None:
            s += f" lens={self.lens}"
        s += f"{' h0' if self.h0 else ''}{' ht' if self.final else ''}{' l2' if self.l2 else ''}"
        s += f" sms={self.sms}{' cfg=' + self.cfg if self.cfg else ''} seed={self.seed}"
        return s


TOL = {torch.float32: 2e-3, torch.bfloat16: 6e-2, torch.float16: 2e-2}


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    d = b.norm()
    return a.norm().item() if d == 0 else ((a - b).norm() / d).item()


@contextlib.contextmanager
def _env(name: str, value: str):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def run_case(
    case: Case, races: bool = True, check: bool = True
) -> tuple[list[str], dict[str, float], dict]:
    """Forward + backward of our Triton kernels under the checker (``check=False``: the guards
    and the reference comparison alone). Returns (problems, relative errors vs the float64
    recurrence, launches per kernel)."""
    impl = triton_chunk._module_in_mode(triton_chunk, interpret=True)
    gen = torch.Generator().manual_seed(case.seed)
    B, T, H, K, V = case.B, case.T, case.H, case.K, case.V
    N = len(case.lens) if case.lens is not None else B
    if case.lens is not None:
        assert B == 1 and sum(case.lens) == T

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    raw = dict(q=randn(B, T, H, K), k=randn(B, T, H, K), v=randn(B, T, H, V))
    if not case.l2:
        raw["k"] = F.normalize(raw["k"], dim=-1)
    raw["g"] = -F.softplus(0.5 * randn(B, T, H) - 2.0)
    raw["beta"] = 2 * torch.sigmoid(randn(B, T, H))
    low = {n: x.to(case.dtype) for n, x in raw.items()}
    if case.g_f32:
        low["g"] = raw["g"]
    if case.h0:
        low["initial_state"] = randn(N, H, K, V)
    cu = None
    if case.lens is not None:
        cu = torch.tensor([0, *np.cumsum(case.lens).tolist()], dtype=torch.int32)

    # guards wider than one chunk's [C, H, max(K, V)] token tile: a tile read a whole chunk past
    # its tensor's end stays inside them (matters only without the checker, which masks it off)
    guards = Guards(pad=64 * H * max(K, V) + GUARD)
    leaves = {n: guards.wrap(n, x).requires_grad_(True) for n, x in low.items()}
    do = guards.wrap("do", randn(B, T, H, V).to(case.dtype))
    dht = guards.wrap("dht", randn(N, H, K, V)) if case.final else None
    kw = dict(scale=K**-0.5, cu_seqlens=cu, use_qk_l2norm_in_kernel=case.l2)

    saved_sm = impl._sm_count
    checker = TritonMemoryChecker(races=races)
    try:
        impl._sm_count = (lambda dev: case.sms) if case.sms else (lambda dev: None)
        watch = checker if check else contextlib.nullcontext()
        with _env("GDN_TRITON_CFG", case.cfg), poisoned_empty(guards), watch:
            o, ht = impl.chunk_gated_delta_rule_triton(
                **leaves, output_final_state=case.final, **kw
            )
            outs, gouts = [o], [do]
            if case.final:
                outs.append(ht)
                gouts.append(dht)
            grads = torch.autograd.grad(outs, list(leaves.values()), gouts)
    finally:
        impl._sm_count = saved_sm

    problems = [f"checker: {v}" for v in checker.violations]
    if checker.n_violations > len(checker.violations):
        problems.append(f"checker: ... {checker.n_violations} violations in all")
    problems += guards.check()
    named = {"o": o, **({"ht": ht} if case.final else {})}
    named.update({f"d{n}": gr for n, gr in zip(leaves, grads)})
    problems += [f"{n} not finite" for n, x in named.items() if not torch.isfinite(x).all()]

    ref = {n: x.detach().double().requires_grad_(True) for n, x in low.items()}
    o_r, ht_r = naive_recurrent_gated_delta_rule(**ref, output_final_state=True, **kw)
    outs_r, gouts_r = [o_r], [do.double()]
    if case.final:
        outs_r.append(ht_r)
        gouts_r.append(dht.double())
    grads_r = torch.autograd.grad(outs_r, list(ref.values()), gouts_r, allow_unused=True)
    refs = {"o": o_r, **({"ht": ht_r} if case.final else {})}
    refs.update({f"d{n}": gr for n, gr in zip(ref, grads_r)})
    errs = {}
    for n, x in named.items():
        r = refs[n] if refs[n] is not None else torch.zeros_like(x, dtype=torch.float64)
        errs[n] = _rel(x, r)
    tol = TOL[case.dtype]
    if case.dtype != torch.float32 and T < 32:
        # with a few tokens a 16-bit o (and dq) can hinge on one q . k that cancels (T = 1:
        # o = scale beta (q . k) v), and the interpreter rounds toward zero: a gross-error bound
        tol = 0.5
    problems += [f"{n} rel. error {e:.2e} > {tol:g}" for n, e in errs.items() if not e <= tol]
    return problems, errs, checker.launches


# ----------------------------------------------------------------------------------------------
# the sweep
# ----------------------------------------------------------------------------------------------

SWEEP_K = (16, 32, 64, 96, 128)
SWEEP_V = (32, 64, 192)
SWEEP_T = (1, 7, 63, 64, 65, 128, 200)
# kernel settings (GDN_TRITON_CFG), mostly the defaults: the candidate fix for the 16-bit faults
# at K <= 32 (kp_min=64), both bwd chunk paths, the chain by Q, the two-product reverse pass,
# the forward state pass without prefetch, the saved forward
SWEEP_CFGS = ("",) * 6 + ("kp_min=64", "split_bchunk=1", "split_bchunk=0", "chain_q=1",
                          "split_bwd=0", "pf_fstate=0", "save_fwd=1")  # fmt: skip


def _random_lens(rng: random.Random, T: int) -> list[int]:
    """Documents that pack to T tokens: one-token runs, empties, chunk-edge lengths."""
    lens, left = [], T
    while left > 0:
        n = min(left, rng.choice([0, 1, 1, 2, 5, 63, 64, 65, rng.randint(1, 130)]))
        lens.append(n)
        left -= n
    if rng.random() < 0.3:
        lens.insert(rng.randrange(len(lens) + 1), 0)
    return lens


def sweep_cases(n: int, seed: int) -> list[Case]:
    rng = random.Random(seed)
    cases = []
    for i in range(n):
        K, V, T = rng.choice(SWEEP_K), rng.choice(SWEEP_V), rng.choice(SWEEP_T)
        packed = rng.random() < 0.5
        case = Case(
            B=1 if packed else rng.randint(1, 3), T=T, H=rng.choice((1, 2, 4)), K=K, V=V,
            dtype=rng.choice((torch.float32, torch.bfloat16)),
            lens=_random_lens(rng, T) if packed else None,
            h0=rng.random() < 0.5, final=rng.random() < 0.5, l2=rng.random() < 0.7,
            sms=rng.choice((H100_SMS, H100_SMS, None)), cfg=rng.choice(SWEEP_CFGS),
            seed=seed * 1000 + i,
        )  # fmt: skip
        cases.append(case)
    return cases


# the test's subset: the test_fp8 reference model's call (default and the candidate fix), the
# K = 16 bf16 configuration of the known fault, chunk-edge packs with empty and one-token
# documents, every default kernel path (fused and split bwd chunk kernels: K a multiple of its K
# block or not), fp32 and bf16
SUBSET = [
    Case(B=2, T=128, H=4, K=32, V=64, dtype=torch.bfloat16, seed=1),  # test_fp8's model
    Case(B=2, T=128, H=4, K=32, V=64, dtype=torch.bfloat16, cfg="kp_min=64", seed=1),  # its fix
    Case(
        B=1,
        T=70,
        H=2,
        K=16,
        V=32,
        dtype=torch.bfloat16,
        lens=[1, 0, 63, 1, 5],
        h0=True,
        final=True,
        seed=2,
    ),
    Case(B=3, T=65, H=1, K=96, V=32, dtype=torch.float32, h0=True, final=True, l2=False, seed=3),
    Case(
        B=1,
        T=7,
        H=2,
        K=64,
        V=192,
        dtype=torch.bfloat16,
        lens=[2, 0, 5, 0],
        final=True,
        sms=None,
        seed=4,
    ),
]


@pytest.mark.parametrize("case", SUBSET, ids=[str(c) for c in SUBSET])
def test_no_out_of_bounds_access(case):
    problems, errs, launches = run_case(case)
    assert not problems, f"{case}: {problems} (errors {errs})"
    assert launches.get("_bwd_chain_kernel") and launches.get("_fwd_state_kernel"), launches


@pytest.mark.skipif(not os.environ.get("GDN_BOUNDS_CASES"), reason="set GDN_BOUNDS_CASES=n")
def test_sweep():
    """The random sweep (GDN_BOUNDS_CASES cases, seed GDN_BOUNDS_SEED)."""
    cases = sweep_cases(
        int(os.environ["GDN_BOUNDS_CASES"]), int(os.environ.get("GDN_BOUNDS_SEED", 0))
    )
    failed = [(str(c), p) for c in cases for p in [run_case(c)[0]] if p]
    assert not failed, failed


# ----------------------------------------------------------------------------------------------
# the checker itself can fail
# ----------------------------------------------------------------------------------------------


def _copy_pairs(x_ptr, y_ptr, n, BLOCK: tl.constexpr, OFF: tl.constexpr, MASK_N: tl.constexpr,
                RACE: tl.constexpr):  # fmt: skip
    """y[i] = x[i + OFF]. Broken variants: MASK_N=False (the mask ignores n), OFF != 0 (an
    off-by-one offset), RACE (y[(i + 1) // 2]: neighbouring programs store the same element)."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    if MASK_N:
        mask = i < n
    else:
        mask = i < BLOCK * 1000
    x = tl.load(x_ptr + i + OFF, mask=mask, other=0.0)
    if RACE:
        tl.store(y_ptr + (i + 1) // 2, x, mask=mask)
    else:
        tl.store(y_ptr + i, x, mask=mask)


def _interpreted(fn):
    """fn decorated with triton.jit in interpreter mode, whatever TRITON_INTERPRET was at import."""
    with triton_chunk._interpret_mode(True):
        return triton.jit(fn)


def _copy(n, block, off=0, mask_n=True, race=False, races=True) -> list[str]:
    x = torch.arange(n, dtype=torch.float32)
    y = torch.zeros(n)
    with TritonMemoryChecker(races=races) as chk:
        _interpreted(_copy_pairs)[(triton.cdiv(n, block),)](
            x, y, n, BLOCK=block, OFF=off, MASK_N=mask_n, RACE=race
        )
    return chk.violations


def test_checker_catches_bad_masks_and_races():
    assert not _copy(64, 16)  # a right kernel passes
    bad = _copy(60, 16, mask_n=False)  # the last program's tail lanes past n
    assert bad and "outside every tensor argument" in bad[0] and "element 60 of" in bad[0], bad
    assert "test_gdn_bounds.py:" in bad[0], bad  # names the kernel's source line
    shifted = _copy(64, 16, off=1)  # an off-by-one offset
    assert shifted and "element 64 of" in shifted[0], shifted
    assert not _copy(64, 16, race=True, races=False)
    race = _copy(64, 16, race=True)  # programs 0 and 1 both store y[8]
    assert race and "overwrites ['y_ptr'] written by program #0 (race)" in race[0], race


def _tok_ptrs_no_length_mask(ptr, tok0, n, h, d0, H: tl.constexpr, D: tl.constexpr,
                             C: tl.constexpr, BD: tl.constexpr):  # fmt: skip
    """common._tok_ptrs with its row mask broken: by the chunk size, not the chunk's length."""
    t_C = tl.arange(0, C)
    d_D = d0 + tl.arange(0, BD)
    base = ptr + (tok0.to(tl.int64) * H + h) * D
    ptrs = base + (t_C[:, None] * (H * D) + d_D[None, :])
    mask = (t_C[:, None] < C) & (d_D[None, :] < D)
    return ptrs, mask


def test_checker_catches_a_broken_gdn_mask(monkeypatch):
    """The same run with the token tiles' sequence-end mask dropped (every chunk read as 64
    tokens; the last chunk here has 5) must fail, on the checker and on the NaN guards."""
    impl = triton_chunk._module_in_mode(triton_chunk, interpret=True)
    pkg = impl._K._fwd_prep_kernel.fn.__module__.rsplit(".", 1)[0]
    monkeypatch.setattr(sys.modules[f"{pkg}.common"], "_tok_ptrs",
                        _interpreted(_tok_ptrs_no_length_mask))  # fmt: skip
    case = Case(B=1, T=70, H=1, K=16, V=32, lens=[1, 64, 5], seed=2)
    problems = run_case(case)[0]
    assert any("outside every tensor argument" in p and "common.py" in p for p in problems), (
        problems
    )
    # without the checker the guards still see it: NaN read from them, or a store into them
    problems = run_case(case, check=False)[0]
    assert any("not finite" in p or "guard of" in p for p in problems), problems


# ----------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--subset", action="store_true", help="the test's cases only")
    ap.add_argument("--no-races", action="store_true")
    args = ap.parse_args(argv)
    cases = SUBSET if args.subset else sweep_cases(args.cases, args.seed)
    n_bad = 0
    for case in cases:
        t0 = time.time()
        problems, errs, _ = run_case(case, races=not args.no_races)
        worst = max(errs, key=errs.get)
        status = "FAIL " + "; ".join(problems) if problems else "ok"
        print(f"{case} | worst {worst} {errs[worst]:.1e} | {time.time() - t0:.1f}s | {status}",
              flush=True)  # fmt: skip
        n_bad += bool(problems)
    print(f"{len(cases) - n_bad}/{len(cases)} cases clean")
    return 1 if n_bad else 0


if __name__ == "__main__":
    sys.exit(main())
