"""Triton's CPU interpreter for the kernel tests on machines without CUDA.

Triton binds its language (``tl.zeros``, ``tl.sum``, ...) to the interpreter or to the compiler
when it is first imported, and each ``@triton.jit`` kernel when its module is imported. So a test
module imports its kernels through ``import_kernels``: on a machine without CUDA, with
``TRITON_INTERPRET=1`` during the import (if Triton is not imported yet, or already bound to the
interpreter), then the variable is restored so that modules collected later keep their default
(torch) dispatch. ``triton_interpreter`` (autouse wherever it is imported) sets it again while
each test runs: dispatch and tile sizes read it.
"""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType

import pytest
import torch

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"


def interpreted(fn) -> bool:
    """Whether a Triton kernel (or ``tl`` function) is bound to the interpreter."""
    return type(fn).__name__ == "InterpretedFunction"


def import_kernels(*names: str) -> list[ModuleType]:
    """Import the named modules, under the interpreter when there is no GPU (see above)."""
    saved = os.environ.get("TRITON_INTERPRET")
    triton = sys.modules.get("triton")
    if not ON_GPU and (triton is None or interpreted(triton.language.zeros)):
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        return [importlib.import_module(name) for name in names]
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved


def skip_module_unless_interpreted(*kernels) -> None:
    """Without CUDA, skip the calling module when Triton was bound to the compiler before it
    could pick the interpreter (another module imported Triton first)."""
    if not ON_GPU and not all(interpreted(k) for k in kernels):
        pytest.skip(
            "triton was imported in compiled mode before this module could select the "
            "interpreter; run tests/kernels on its own (or with TRITON_INTERPRET=1)",
            allow_module_level=True,
        )


@pytest.fixture(autouse=True)
def triton_interpreter(monkeypatch):
    """Without CUDA: TRITON_INTERPRET=1 while a test runs."""
    if not ON_GPU:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
