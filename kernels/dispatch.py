"""When our Triton kernels can run: on CUDA tensors, or on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1``, how CI exercises them). Shared by every kernel's ``backend="auto"``."""

from __future__ import annotations

import importlib.util
import os


def triton_interpreting() -> bool:
    """TRITON_INTERPRET=1: run our Triton kernels on CPU tensors in Triton's interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


BACKENDS = ("auto", "torch", "triton")
"""The ``backend`` values of the elementwise kernels (cross entropy, QK-norm, SwiGLU, column
splits); the GDN and conv ops have their own (kernels/gdn/api.py, conv.py)."""


def use_triton(x, backend: str, op: str) -> bool:
    """Whether ``op`` runs our Triton kernel on ``x``: "triton" always, "torch" never, "auto" for
    CUDA tensors or under TRITON_INTERPRET=1, when Triton is importable. A bad name is an error
    that says which op and which names are valid."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown {op} backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if backend == "auto":
        return (x.is_cuda or triton_interpreting()) and triton_available()
    return backend == "triton"
