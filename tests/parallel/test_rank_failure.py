"""A run in which one rank dies leaves no process behind: torchrun stops the other ranks, and
every helper process of a rank (megatron's checkpoint-writer Manager, multiprocessing's resource
tracker) exits with its rank (training/helper_processes.py). Before, the Manager ignored
SIGTERM and outlived a killed rank forever, holding the resource tracker with it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

from tests.conftest import ROOT, TINY_MOCK, free_port


def _start(tmp_path, nproc: int, extra: list[str]):
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
        f"--master-port={free_port()}", "-m", "megatron_hybrid.train", *TINY_MOCK,
        "--train-iters", "500", "--log-interval", "1", "--save", str(tmp_path / "ckpt"),
        "--save-interval", "1000", *extra,
    ]  # fmt: skip
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.parametrize("victim", [0, 1])
def test_killing_one_rank_leaves_no_process(tmp_path, victim):
    proc = _start(tmp_path, 2, ["--context-parallel-size", "2"])
    lines: list[str] = []
    second = threading.Event()

    def drain():  # keep reading so the pipe never fills; note the second iteration
        for line in proc.stdout:
            lines.append(line)
            if "iteration        2/" in line:
                second.set()

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    family: list[psutil.Process] = []
    try:
        assert second.wait(240), "".join(lines[-40:])
        family = psutil.Process(proc.pid).children(recursive=True)
        ranks = {}
        for p in family:
            env_rank = p.environ().get("RANK") if "megatron_hybrid.train" in p.cmdline() else None
            if env_rank is not None:
                ranks[int(env_rank)] = p
        helpers = [p for p in family if p not in ranks.values()]
        assert sorted(ranks) == [0, 1], [p.cmdline() for p in family]
        assert len(helpers) >= 2, [p.cmdline() for p in family]  # a Manager per rank at least
        ranks[victim].send_signal(signal.SIGKILL)
        proc.wait(timeout=120)
        reader.join(10)
        deadline = time.time() + 10
        while time.time() < deadline and any(_alive(p) for p in family):
            time.sleep(0.2)
        left = [(p.pid, " ".join(p.cmdline())[:120]) for p in family if _alive(p)]
        assert not left, left
        assert proc.returncode != 0
        out = "".join(lines)
        assert "Signal 9" in out or "SIGKILL" in out, out[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for p in family:  # whatever a failing run left, so it cannot disturb later tests
            if _alive(p):
                p.kill()
