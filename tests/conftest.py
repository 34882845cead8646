"""Shared test helpers: run a command under torchrun (gloo on CPU) and parse PARITY lines."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_hybrid.parallel.child_env import without_rendezvous

ROOT = Path(__file__).resolve().parents[1]
TINY_HF_CONFIG = ROOT / "tests" / "fixtures" / "tiny_hf_config.json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_python(
    args: list[str], nproc: int = 1, timeout: int = 300, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run ``python <args>`` (``torchrun --nproc-per-node nproc`` when nproc > 1) from the repo
    root; ``env`` adds variables to the environment.

    The rendezvous variables of this process are not inherited: a test that set up a process
    group in-process (parallel.state.initialize writes MASTER_PORT) would otherwise hand its own,
    still bound, port to the child, which then fails with EADDRINUSE (seen on the H100)."""
    base = without_rendezvous(os.environ)
    base.update(TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env = {**base, **(env or {})}
    if nproc > 1:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc-per-node={nproc}",
            f"--master-port={free_port()}",
            *args,
        ]
    else:
        cmd = [sys.executable, *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def hf_config_variant(tmp_path: Path, name: str = "cfg", **changes) -> Path:
    cfg = json.loads(TINY_HF_CONFIG.read_text())
    cfg.update(changes)
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return path


@pytest.fixture
def make_hf_config(tmp_path):
    return lambda name="cfg", **changes: hf_config_variant(tmp_path, name, **changes)


LOSS_RE = r"iteration\s+(\d+)/\s*\d+ \|.*?\| lm loss: ([0-9.E+-]+|NAN|INF) \|.*?grad norm: ([0-9.a-z]+) \|"


def train_cmd(*extra: str) -> list[str]:
    return ["-m", "megatron_hybrid.train", *extra]


TINY_MOCK = [
    "--preset",
    "tiny",
    "--mock-data",
    "--seq-length",
    "64",
    "--global-batch-size",
    "4",
    "--micro-batch-size",
    "1",
    "--lr",
    "1e-3",
    "--lr-warmup-iters",
    "1",
    "--deterministic",
]


def parse_losses(stdout: str) -> dict[int, tuple[float, float]]:
    """iteration -> (lm loss, grad norm) from Megatron iteration lines."""
    import re

    out = {}
    for m in re.finditer(LOSS_RE, stdout):
        out[int(m.group(1))] = (float(m.group(2)), float(m.group(3)))
    return out


def concurrently(*calls):
    """Call the zero-argument callables (typically each a ``run_python``) at the same time, in
    threads, and return their results in order; the first exception (in call order) is raised.
    For independent single-rank subprocesses: a 1-rank run keeps one core busy (run_python sets
    OMP_NUM_THREADS=1), and the CI machine has two."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        futures = [pool.submit(call) for call in calls]
        return [f.result() for f in futures]
