"""End-to-end training runs on CPU (gloo): resume, crash-safe saves, NaN handling, real data,
data errors, TensorBoard, TP/DP layouts and checkpoint resharding."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from tests.conftest import ROOT, TINY_MOCK, free_port, parse_losses, run_python, train_cmd

ITERS = ["--train-iters", "6"]


@pytest.fixture(scope="module")
def reference():
    proc = run_python(train_cmd(*TINY_MOCK, *ITERS))
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = parse_losses(proc.stdout)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    return losses


@pytest.mark.parametrize(
    "layout",
    [
        ["--tensor-model-parallel-size", "2"],
        ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
        ["--use-distributed-optimizer"],
    ],
)
def test_tp_and_dp_reproduce_single_rank(reference, layout):
    proc = run_python(train_cmd(*TINY_MOCK, *ITERS, *layout), nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = parse_losses(proc.stdout)
    for it, (loss, gnorm) in reference.items():
        assert got[it][0] == pytest.approx(loss, rel=2e-4), (it, got[it], loss)
        assert got[it][1] == pytest.approx(gnorm, rel=2e-3), (it, got[it], gnorm)


def test_sigkill_and_resume_is_bitwise(reference, tmp_path):
    save = str(tmp_path / "ckpt")
    args = train_cmd(*TINY_MOCK, *ITERS, "--save", save, "--load", save, "--save-interval", "3")
    # The job SIGKILLs its own process group (torchrun + both ranks) right after iteration 4 is
    # logged: a hard crash at a known point, no cleanup, no final save.
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1", MEGATRON_HYBRID_FAULT="sigkill_at:4")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node=2",
        f"--master-port={free_port()}",
        *args,
    ]
    proc = subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, start_new_session=True
    )
    # torchrun puts workers in their own process group: rank 0 dies by SIGKILL, torchrun reports it
    # and tears the job down.
    assert proc.returncode != 0 and "SIGKILL" in proc.stderr, proc.stderr[-2000:]
    assert "saved checkpoint at iteration 3" in proc.stdout
    assert "iteration        5/" not in proc.stdout
    resumed = run_python(args, nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "at iteration 3" in resumed.stdout
    got = parse_losses(resumed.stdout)
    assert sorted(got) == [4, 5, 6]
    dp2 = run_python(train_cmd(*TINY_MOCK, *ITERS, "--use-distributed-optimizer"), nproc=2)
    uninterrupted = parse_losses(dp2.stdout) if dp2.returncode == 0 else reference
    for it in (4, 5, 6):
        assert got[it] == uninterrupted[it], (it, got[it], uninterrupted[it])
    assert open(os.path.join(save, "latest_checkpointed_iteration.txt")).read() == "6"
    cfg = json.load(open(os.path.join(save, "iter_0000006", "run_config.json")))
    assert cfg["model"]["hidden_size"] == 96 and cfg["train"]["train_iters"] == 6


def test_crash_during_save_keeps_previous_checkpoint(reference, tmp_path):
    save = str(tmp_path / "ckpt")
    args = train_cmd(
        *TINY_MOCK, *ITERS, "--save", save, "--load", save, "--save-interval", "2",
        "--keep-last-checkpoints", "1",
    )  # fmt: skip
    env_fault = dict(os.environ, MEGATRON_HYBRID_FAULT="crash_in_save:4")
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=env_fault,
        capture_output=True,
        text=True,
        timeout=300,
        start_new_session=True,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert open(os.path.join(save, "latest_checkpointed_iteration.txt")).read() == "2"
    assert os.path.isdir(os.path.join(save, "iter_0000002"))
    assert not os.path.exists(os.path.join(save, "iter_0000004"))
    resumed = run_python(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got = parse_losses(resumed.stdout)
    assert sorted(got) == [3, 4, 5, 6]
    for it in got:
        assert got[it] == reference[it]
    # --keep-last-checkpoints 1: each new save removed the one before, after publishing
    assert sorted(n for n in os.listdir(save) if n.startswith("iter_")) == ["iter_0000006"]


def test_nan_steps_are_skipped_counted_and_stop_the_run():
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1", MEGATRON_HYBRID_FAULT="nan_loss:2")
    proc = subprocess.run(
        [sys.executable, *train_cmd(*TINY_MOCK, "--train-iters", "4")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [ln for ln in proc.stdout.splitlines() if "iteration " in ln]
    assert "number of nan iterations:   1" in lines[1] and "lm loss: NAN" in lines[1]
    assert "number of nan iterations:   1" in lines[3] and "lm loss: NAN" not in lines[3]
    env["MEGATRON_HYBRID_FAULT"] = "nan_loss:2,3,4"
    proc = subprocess.run(
        [
            sys.executable,
            *train_cmd(*TINY_MOCK, "--train-iters", "6", "train.max_consecutive_nan=3"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "3 consecutive iterations with NaN/inf" in proc.stderr


def test_reshard_tp2_checkpoint_loads_at_tp1(reference, tmp_path):
    save = str(tmp_path / "ckpt")
    first = run_python(
        train_cmd(
            *TINY_MOCK,
            *ITERS,
            "--exit-interval",
            "3",
            "--tensor-model-parallel-size",
            "2",
            "--save",
            save,
        ),
        nproc=2,
    )
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_python(train_cmd(*TINY_MOCK, *ITERS, "--load", save))
    assert second.returncode == 0, second.stderr[-3000:]
    got = parse_losses(second.stdout)
    for it in (4, 5, 6):
        assert got[it][0] == pytest.approx(reference[it][0], rel=2e-4)


def test_tensorboard_and_eval(tmp_path):
    tb = tmp_path / "tb"
    proc = run_python(
        train_cmd(
            *TINY_MOCK,
            "--train-iters",
            "2",
            "--eval-interval",
            "2",
            "--eval-iters",
            "1",
            "--tensorboard-dir",
            str(tb),
        )
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "validation loss at iteration 2 | lm loss value:" in proc.stdout
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tb))
