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
