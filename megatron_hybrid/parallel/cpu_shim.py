"""Make megatron-core 0.19 run on CPU with gloo. Applied only when CUDA is absent.

megatron-core assumes CUDA in a handful of places that are not about compute at all: it asks
for ``torch.cuda.current_device()`` to place tensors, synchronises streams, forks the CUDA RNG
for tensor-parallel init/dropout, writes ``device="cuda"`` literals in schedules and the
optimizer, and checks ``param.type() == 'torch.cuda.FloatTensor'``. Everything here redirects
those to the CPU so that the *real* megatron-core code paths (parallel linears, HybridModel,
schedules, DDP, distributed optimizer, dist checkpointing) run in CI. Nothing numerical is
replaced. ``tests/parallel/test_cpu_shim.py`` checks every entry point, so a megatron-core
upgrade that moves one of them fails loudly there instead of somewhere deep in a test.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch.overrides import TorchFunctionMode

_INSTALLED = False


def _to_cpu_device(device):
    """Map any CUDA device spec to the CPU; leave everything else alone."""
    if device is None:
        return None
    if isinstance(device, int):
        return torch.device("cpu")
    if isinstance(device, str) and device.startswith("cuda"):
        return torch.device("cpu")
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites ``device=`` keyword arguments that name CUDA to the CPU (factory calls, .to()),
    and drops ``pin_memory=True`` (pinning needs a CUDA driver; megatron's CP RoPE slicing asks
    for it)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func in (torch.Tensor.to,) and args and len(args) > 1:
            dev = _to_cpu_device(args[1]) if isinstance(args[1], (str, torch.device)) else args[1]
            args = (args[0], dev, *args[2:])
        return func(*args, **kwargs)


class _NullStream:
    """Stands in for a CUDA stream: ordering is trivially satisfied on the CPU."""

    def __init__(self, *_a, **_k):
        pass

    def wait_event(self, *_a, **_k):
        return None

    def wait_stream(self, *_a, **_k):
        return None

    def record_event(self, *_a, **_k):
        return _NullEvent()

    def synchronize(self):
        return None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _NullEvent:
    def __init__(self, *_a, **_k):
        pass

    def record(self, *_a, **_k):
        return None

    def wait(self, *_a, **_k):
        return None

    def synchronize(self):
        return None

    def query(self):
        return True


def _cpu_float_type(self):
    """``Tensor.type()`` that reports CPU float tensors as CUDA ones (megatron's optimizer checks)."""
    t = _ORIG_TENSOR_TYPE(self)
    return (
        t.replace("torch.", "torch.cuda.", 1) if t.startswith("torch.") and "cuda" not in t else t
    )


_ORIG_TENSOR_TYPE = torch.Tensor.type


def install_cpu_shim() -> bool:
    """Install the shim once. Returns True when installed, False when CUDA is present."""
    global _INSTALLED
    if torch.cuda.is_available():
        return False
    if _INSTALLED:
        return True
    # Inductor would try to build C++ for every compiled fusion (minutes on 2 cores).
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

    cuda = torch.cuda
    cuda.current_device = lambda: torch.device("cpu")
    cuda.set_device = lambda *_a, **_k: None
    cuda.synchronize = lambda *_a, **_k: None
    cuda.empty_cache = lambda: None
    cuda.current_stream = lambda *_a, **_k: _NullStream()
    cuda.default_stream = lambda *_a, **_k: _NullStream()
    # Classes, not lambdas: other libraries use them in type annotations (``Stream | None``).
    cuda.Stream = _NullStream
    cuda.Event = _NullEvent
    cuda.stream = lambda *_a, **_k: contextlib.nullcontext()
    cuda.get_rng_state = lambda *_a, **_k: torch.get_rng_state()
    cuda.set_rng_state = lambda state, *_a, **_k: torch.set_rng_state(state)
    cuda.manual_seed = lambda seed: None  # the CPU generator is seeded by torch.manual_seed
    cuda.manual_seed_all = lambda seed: None
    cuda.max_memory_allocated = lambda *_a, **_k: 0
    cuda.memory_allocated = lambda *_a, **_k: 0
    cuda.reset_peak_memory_stats = lambda *_a, **_k: None
    torch.Tensor.cuda = lambda self, *_a, **_k: self
    torch.nn.Module.cuda = lambda self, *_a, **_k: self
    torch.Tensor.type = lambda self, *a, **k: (
        _ORIG_TENSOR_TYPE(self, *a, **k) if a or k else _cpu_float_type(self)
    )

    from megatron.core.tensor_parallel import random as mp_random

    mp_random._get_cuda_rng_state = lambda *_a, **_k: torch.get_rng_state()
    mp_random._set_cuda_rng_state = lambda state, *_a, **_k: torch.set_rng_state(state)

    _CudaToCpuMode().__enter__()  # process-wide: stays active for the life of the process
    _INSTALLED = True
    return True


def is_installed() -> bool:
    return _INSTALLED
