"""Test hook: failures injected at chosen iterations (the test suite proves NaN skipping,
crash-safe saves and hard crashes with it). Its own module so that the loop and the checkpoint
code both read it without importing each other."""

from __future__ import annotations

import os


def fault_iterations(kind: str) -> set[int]:
    """``MEGATRON_HYBRID_FAULT="nan_loss:3,4;crash_in_save:6"`` injects failures of ``kind`` at
    those iterations (kinds: nan_loss, sigkill_at, crash_in_save, nan_in_save)."""
    spec = os.environ.get("MEGATRON_HYBRID_FAULT", "")
    for part in spec.split(";"):
        name, _, its = part.partition(":")
        if name.strip() == kind and its:
            return {int(x) for x in its.split(",") if x.strip()}
    return set()
