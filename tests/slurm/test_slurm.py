"""The sbatch examples (examples/slurm/) on a real one-node Slurm cluster on localhost.

The cluster (tests/slurm/localslurm.py) is Debian's slurm-wlm: munged, slurmctld and slurmd run
as root in the background for this module, configured under a temp dir, and torn down at the
end. Jobs run the real scripts with CPU overrides (DEVICE=cpu: gloo, 2 ranks, the tiny preset):

* pretrain.sbatch (torchrun per node) trains, logs Megatron iteration lines, saves;
* SIGUSR1 to the batch shell (`scancel --batch --signal=USR1`: what `#SBATCH --signal=B:USR1@T`
  sends before the time limit) -> the ranks save, the job requeues itself and the requeued run
  resumes from the saved iteration and finishes;
* pretrain_pyxis.sbatch without a container (CONTAINER_IMAGE=none): one task per rank, ranks
  from SLURM_PROCID; its container command line is checked in DRY_RUN mode;
* preprocess.sbatch and convert_to_hf.sbatch run the tools.

Skipped (with the reason) only when Slurm is absent and cannot be installed (not root, no apt).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.slurm.localslurm import LocalSlurm, install_reason

pytestmark = pytest.mark.slow

SLURM_DIR = ROOT / "examples" / "slurm"
SCRIPTS = sorted(SLURM_DIR.glob("*.sbatch"))
PYTHON = sys.executable  # the repo's venv: the jobs' PYTHON override

# The CPU smoke settings every training job here uses (overrides of the script's defaults).
TINY = {
    "CONFIG": "",
    "PRESET": "tiny",
    "DATA": "mock",
    "SEQ": "64",
    "GBS": "4",
    "MBS": "1",
    "GPUS_PER_NODE": "2",
    "DEVICE": "cpu",
    "PYTHON": PYTHON,
    "TORCHDYNAMO_DISABLE": "1",
    "OMP_NUM_THREADS": "1",
}
ITER_RE = re.compile(r"^\[[0-9-]+ [0-9:.]+\] iteration +(\d+)/ +(\d+) \| consumed samples:", re.M)
FINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}


# ---- without a cluster -----------------------------------------------------------------------
@pytest.mark.parametrize("script", [*SCRIPTS, SLURM_DIR / "signal_ranks.sh"], ids=lambda p: p.name)
def test_scripts_parse(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    text = script.read_text()
    assert text.startswith("#!/bin/bash\n")
    if script.suffix == ".sbatch":
        assert "set -euo pipefail" in text and "#SBATCH --output=logs/%x-%j.out" in text
    if shutil.which("shellcheck"):
        lint = subprocess.run(["shellcheck", "-S", "warning", str(script)], capture_output=True)
        assert lint.returncode == 0, lint.stdout.decode()


def _dry_run(script: str, **env) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    full.update(DRY_RUN="1", PREFLIGHT="0", **env)
    return subprocess.run(
        ["bash", str(SLURM_DIR / script)], cwd=ROOT, env=full, capture_output=True, text=True
    )


def _line(stdout: str, prefix: str) -> str:
    for line in stdout.splitlines():
        if line.startswith(prefix):
            return line[len(prefix) :].strip()
    raise AssertionError(f"no line starting with {prefix!r} in:\n{stdout}")


def test_pyxis_command_line():
    image = "nvcr.io#nvidia/pytorch:25.09-py3"
    proc = _dry_run(
        "pretrain_pyxis.sbatch",
        CONTAINER_IMAGE=image,
        CONTAINER_MOUNTS="/work/repo:/workspace/megatron_hybrid,/lustre:/lustre",
        SLURM_NNODES="2",
        SLURM_JOB_ID="4242",
        DATA="/lustre/data/web_text_document",
        SAVE="/lustre/ckpt/7b",
        GBS="256",
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "layout: 2 nodes x 8 = 16 ranks = TP 2 x PP 2 x CP 1 x DP 4" in out
    assert re.search(r"^git: [0-9a-f]{40}", out, re.M)
    assert "MASTER_PORT=19242" in _line(out, "env: MASTER_ADDR=")  # 15000 + 4242 % 40000
    assert "env: CUDA_DEVICE_MAX_CONNECTIONS=1" in out
    launch = shlex.split(_line(out, "launch:"))
    assert launch[:4] == ["srun", "--kill-on-bad-exit=1", "--nodes=2", "--ntasks-per-node=8"]
    assert f"--container-image={image}" in launch
    assert "--container-mounts=/work/repo:/workspace/megatron_hybrid,/lustre:/lustre" in launch
    assert "--container-workdir=/workspace/megatron_hybrid" in launch
    assert "--no-container-mount-home" in launch
    assert launch[-3:] == ["bash", "-c", "$TASK_CMD"]
    task = _line(out, "TASK_CMD:")
    assert task.startswith("export TRITON_CACHE_DIR=/tmp/triton_cache_4242_$SLURM_NODEID; exec ")
    cmd = shlex.split(task.split("; exec ", 1)[1])
    assert cmd[:3] == ["bash", "examples/slurm/signal_ranks.sh", "self"]
    assert "torch.distributed.run" not in cmd  # one task per GPU: ranks come from Slurm
    assert cmd[3:6] == ["python3", "-m", "megatron_hybrid.train"]
    args = cmd[6:]
    for flag, value in [
        ("--config", "examples/configs/olmo_hybrid_7b.yaml"),
        ("--tensor-model-parallel-size", "2"),
        ("--pipeline-model-parallel-size", "2"),
        ("--context-parallel-size", "1"),
        ("--global-batch-size", "256"),
        ("--data-path", "/lustre/data/web_text_document"),
        ("--save", "/lustre/ckpt/7b"),
        ("--load", "/lustre/ckpt/7b"),
    ]:
        assert args[args.index(flag) + 1] == value, (flag, args)
    # the trainer accepts exactly these arguments (its own dry run at this world size)
    check = subprocess.run(
        [PYTHON, "-m", "megatron_hybrid.train", *args, "--dry-run", "--world-size", "16"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=dict(os.environ, CUDA_VISIBLE_DEVICES=""),
    )
    assert check.returncode == 0, check.stderr[-2000:]
    assert "parallel layout: world 16 = TP 2 x PP 2 x CP 1 x DP 4" in check.stdout


def test_pretrain_command_line_and_bad_layout():
    proc = _dry_run(
        "pretrain.sbatch", SLURM_NNODES="4", SLURM_JOB_ID="77", DATA="mock", TP="2", CP="2", PP="1"
    )
    assert proc.returncode == 0, proc.stderr
    assert "layout: 4 nodes x 8 = 32 ranks = TP 2 x PP 1 x CP 2 x DP 8" in proc.stdout
    node = _line(proc.stdout, "NODE_CMD:")
    assert node.startswith("export TRITON_CACHE_DIR=/tmp/triton_cache_77_$SLURM_NODEID; exec ")
    cmd = shlex.split(node.split("; exec ", 1)[1])
    assert cmd[:6] == [
        "bash",
        "examples/slurm/signal_ranks.sh",
        "children",
        "python3",
        "-m",
        "torch.distributed.run",
    ]
    cmd = cmd[3:]
    i = cmd.index("-m", 3)
    assert cmd[3:i] == [
        "--nnodes",
        "4",
        "--nproc-per-node",
        "8",
        "--node-rank",
        "$SLURM_NODEID",  # expanded on each node by the per-node bash
        "--master-addr",
        cmd[10],
        "--master-port",
        str(15000 + 77),
    ]
    bad = _dry_run("pretrain.sbatch", DATA="mock", TP="3")
    assert bad.returncode == 2 and "8 ranks is not divisible by TP 3 x PP 2 x CP 1" in bad.stderr
    nodata = _dry_run("pretrain.sbatch")
    assert nodata.returncode == 2 and "no training data" in nodata.stderr


def test_pretrain_fp8_setting_adds_the_flags():
    proc = _dry_run("pretrain.sbatch", DATA="mock", FP8="tensorwise")
    assert proc.returncode == 0, proc.stderr
    assert "| FP8 tensorwise |" in proc.stdout
    assert "--fp8-format hybrid --fp8-recipe tensorwise" in proc.stdout
    off = _dry_run("pretrain.sbatch", DATA="mock")
    assert "| FP8 off |" in off.stdout and "--fp8-format" not in off.stdout


FAKE_LAUNCH = """
import multiprocessing as mp, os, signal, subprocess, sys, time
out = sys.argv[2]
def log(msg):
    with open(out, "a") as f:
        f.write(msg + "\\n")
def helper(path):  # like megatron's checkpoint writer: a spawned process, default SIGUSR1
    global out
    out = path
    time.sleep(6)
    log("helper alive")
if __name__ == "__main__":
    if sys.argv[1] == "launcher":  # like torchrun: ranks in their own sessions
        ps = [subprocess.Popen([sys.executable, __file__, "rank", out], start_new_session=True)
              for _ in range(2)]
        sys.exit(max(p.wait() for p in ps))
    got = []
    signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))
    h = mp.get_context("spawn").Process(target=helper, args=(out,))
    h.start()
    log("ready")
    for _ in range(150):
        if got:
            break
        time.sleep(0.1)
    h.join()
    log(f"rank got {got} helper exit {h.exitcode}")
"""


def _descendants(pid: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = open(f"/proc/{d}/stat").read()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            parents.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


@pytest.mark.parametrize("mode", ["children", "self"])
def test_signal_ranks_reaches_only_the_ranks(tmp_path, mode):
    """SIGURG to every process (what `scancel --signal=URG` does to a step) -> SIGUSR1 for the
    ranks only: the launcher (torchrun) and the ranks' spawned helpers survive."""
    fake = tmp_path / "fake.py"
    fake.write_text(FAKE_LAUNCH)
    log = tmp_path / "log"
    role = "launcher" if mode == "children" else "rank"
    wrapper = subprocess.Popen(
        [
            "bash",
            str(SLURM_DIR / "signal_ranks.sh"),
            mode,
            sys.executable,
            str(fake),
            role,
            str(log),
        ]
    )
    ranks = 2 if mode == "children" else 1
    deadline = time.time() + 60
    while time.time() < deadline and (not log.exists() or log.read_text().count("ready") < ranks):
        time.sleep(0.1)
    for pid in [wrapper.pid, *_descendants(wrapper.pid)]:
        os.kill(pid, signal.SIGURG)
    assert wrapper.wait(timeout=60) == 0
    lines = log.read_text().splitlines()
    assert lines.count("rank got [10] helper exit 0") == ranks, lines
    assert lines.count("helper alive") == ranks, lines


# ---- on the cluster --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = install_reason()
    if reason:
        pytest.skip(f"no Slurm: {reason}")
    if os.geteuid() != 0:
        pytest.skip("the local Slurm cluster runs slurmd as root")
    c = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        c.start()
    except Exception:
        c.stop()
        raise
    yield c
    c.stop()


class Job:
    def __init__(self, cluster: LocalSlurm, job_id: str, log: Path):
        self.cluster, self.id, self.log = cluster, job_id, log

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def field(self, name: str) -> str | None:
        return self.cluster.job_field(self.id, name)

    def wait(self, timeout: float, restarts: int = 0) -> str:
        """Poll until the job reached a final state after `restarts` requeues (sbatch --wait
        backs off up to 30 s between polls, too slow for a test)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            state = self.field("JobState")
            if state in FINAL_STATES and int(self.field("Restarts") or 0) >= restarts:
                return state
            time.sleep(0.5)
        self.cluster.cmd(["scancel", self.id], check=False)
        raise AssertionError(
            f"job {self.id} not done after {timeout}s: {self.field('JobState')}\n"
            f"{self.text()[-4000:]}\n{self.cluster.logs()}"
        )

    def wait_for(self, pattern: str, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if re.search(pattern, self.text(), re.M):
                return
            if self.field("JobState") in FINAL_STATES:
                break
            time.sleep(0.25)
        raise AssertionError(f"{pattern!r} not in the log of job {self.id}:\n{self.text()[-4000:]}")


def submit(cluster, tmp_path, script: str, settings: dict, *sbatch_args: str) -> Job:
    """sbatch with the settings as `--export=ALL,KEY=VAL,...`, from the repo root."""
    export = ",".join(["ALL"] + [f"{k}={v}" for k, v in settings.items()])
    proc = cluster.cmd(
        [
            "sbatch",
            "--parsable",
            f"--output={tmp_path}/%x-%j.out",
            f"--export={export}",
            *sbatch_args,
            str(SLURM_DIR / script),
        ],
        cwd=ROOT,
    )
    job_id = proc.stdout.strip().split(";")[0]
    name = {"pretrain.sbatch": "olmo-hybrid", "pretrain_pyxis.sbatch": "olmo-hybrid"}.get(
        script, script.removesuffix(".sbatch").replace("_", "-")
    )
    return Job(cluster, job_id, tmp_path / f"{name}-{job_id}.out")


def iterations(log: str) -> list[int]:
    return [int(m.group(1)) for m in ITER_RE.finditer(log)]


@pytest.fixture(scope="module")
def pretrained(cluster, tmp_path_factory):
    """(a) pretrain.sbatch, tiny preset on CPU with 2 gloo ranks under torchrun: log + save."""
    tmp = tmp_path_factory.mktemp("pretrain")
    save = tmp / "ckpt"
    job = submit(cluster, tmp, "pretrain.sbatch", {**TINY, "ITERS": "6", "SAVE": str(save)})
    state = job.wait(timeout=180)
    return job, state, save


def test_pretrain_job_trains_and_saves(pretrained):
    job, state, save = pretrained
    log = job.text()
    assert state == "COMPLETED" and job.field("ExitCode") == "0:0", log[-4000:]
    head = log.splitlines()
    assert head[0].startswith("=== ") and f"job {job.id} (restart 0)" in head[0]
    assert re.match(r"git: [0-9a-f]{40}", head[1]), head[:3]
    assert head[2].startswith("layout: 1 nodes x 2 = 2 ranks = TP 1 x PP 1 x CP 1 x DP 2")
    assert iterations(log) == [1, 2, 3, 4, 5, 6], log[-3000:]
    assert "lm loss:" in log and "tokens per GPU (tokens/s/GPU):" in log
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "6"
    assert (save / "iter_0000006" / "run_config.json").exists()
    assert "training exited with status 0" in log and "requeueing" not in log


def test_usr1_saves_requeues_and_resumes(cluster, tmp_path):
    """(b) what `--signal=B:USR1@T` does before the time limit, sent now with scancel."""
    save = tmp_path / "ckpt"
    job = submit(
        cluster,
        tmp_path,
        "pretrain.sbatch",
        # periodic saves before the signal: the checkpoint writer's helper process exists and
        # must survive the stop request
        {**TINY, "ITERS": "40", "SAVE": str(save), "SAVE_INTERVAL": "2", "PREFLIGHT": "0"},
    )
    job.wait_for(r"iteration +5/ +40 \|", timeout=120)
    cluster.cmd(["scancel", "--batch", "--signal=USR1", job.id])
    state = job.wait(timeout=240, restarts=1)
    log = job.text()
    assert state == "COMPLETED" and job.field("ExitCode") == "0:0", log[-5000:]
    assert job.field("Restarts") == "1"
    first, _, second = log.partition(f"job {job.id} (restart 1)")
    assert second, f"the job did not run again after requeueing:\n{log[-5000:]}"
    # first run: signal forwarded, every rank stopped at the same step, one save, requeue
    assert "SIGUSR1 (time limit near)" in first
    stops = re.findall(r"rank (\d): stopped by signal \S+ at iteration (\d+)", first)
    assert sorted(r for r, _ in stops) == ["0", "1"] and len({it for _, it in stops}) == 1, first
    n = int(stops[0][1])
    assert 5 <= n < 40
    assert f"saved checkpoint at iteration {n} to {save}/iter_{n:07d}" in first
    assert f"requeueing job {job.id}: it resumes from {save} (iteration {n})" in first
    assert iterations(first) == list(range(1, n + 1))
    # second run: resumed at the saved step, no step repeated or skipped, finished
    assert f"save/load: {save} (latest: {n})" in second
    assert f"resumed from {save}/iter_{n:07d} at iteration {n}" in second
    assert iterations(second) == list(range(n + 1, 41))
    assert "training exited with status 0" in second and "requeueing" not in second
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "40"


def test_pyxis_script_without_container_ranks_from_slurm(cluster, tmp_path):
    """One task per rank, no torchrun: RANK/WORLD_SIZE/LOCAL_RANK come from SLURM_* variables."""
    save = tmp_path / "ckpt"
    job = submit(
        cluster,
        tmp_path,
        "pretrain_pyxis.sbatch",
        {**TINY, "CONTAINER_IMAGE": "none", "ITERS": "3", "SAVE": str(save), "TP": "2"},
        "--ntasks-per-node=2",  # the script asks for 8 (one per GPU); this node has 2 CPUs
    )
    state = job.wait(timeout=180)
    log = job.text()
    assert state == "COMPLETED" and job.field("ExitCode") == "0:0", log[-4000:]
    assert "layout: 1 nodes x 2 = 2 ranks = TP 2 x PP 1 x CP 1 x DP 1" in log
    assert "parallel layout: world 2 = TP 2 x PP 1 x CP 1 x DP 1" in log  # the trainer's banner
    assert "torch.distributed.run" not in _line(log, "TASK_CMD:")
    assert iterations(log) == [1, 2, 3]
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "3"


def test_preprocess_job(cluster, tmp_path):
    from megatron_hybrid.data.tokenizer_training import train_sentencepiece

    docs = tmp_path / "docs.jsonl"
    with open(docs, "w") as f:
        for i in range(200):
            f.write(json.dumps({"text": f"def f_{i}(x):\n    return x * {i}  # doc {i}\n"}) + "\n")
    tok = train_sentencepiece([str(docs)], str(tmp_path / "tok"), vocab_size=300)
    prefix = tmp_path / "out" / "corpus"
    job = submit(
        cluster,
        tmp_path,
        "preprocess.sbatch",
        {
            "INPUT": str(docs),
            "OUTPUT_PREFIX": str(prefix),
            "TOKENIZER_TYPE": "SentencePieceTokenizer",
            "TOKENIZER_MODEL": tok,
            "PYTHON": PYTHON,
            "EXTRA_ARGS": "--no-progress",
        },
        "--cpus-per-task=2",  # the script asks for 32
        "--mem=0",
    )
    state = job.wait(timeout=120)
    log = job.text()
    assert state == "COMPLETED", log[-4000:]
    assert "layout: 1 task, 2 tokenizer workers" in log
    for ext in (".bin", ".idx"):
        assert Path(f"{prefix}_text_document{ext}").stat().st_size > 0
    assert f"DATA={prefix}_text_document" in log


def test_convert_to_hf_job(cluster, pretrained, tmp_path):
    if not (ROOT / "tools" / "convert_to_hf.py").exists():
        pytest.skip("tools/convert_to_hf.py is not in this checkout")
    _, state, save = pretrained
    assert state == "COMPLETED"
    hf = tmp_path / "hf"
    job = submit(
        cluster,
        tmp_path,
        "convert_to_hf.sbatch",
        {"LOAD": str(save), "HF_DIR": str(hf), "PYTHON": PYTHON},
        "--cpus-per-task=2",  # the script asks for 16 CPUs and 160G
        "--mem=0",
    )
    state = job.wait(timeout=180)
    log = job.text()
    assert state == "COMPLETED" and job.field("ExitCode") == "0:0", log[-4000:]
    assert "iteration latest = 6" in log and "VALIDATION OK" in log
    assert (hf / "config.json").exists()


def test_scaling_ladder_array_trains_every_rung(cluster, tmp_path):
    """scaling_ladder.sbatch as the array its header describes: the corpus built once by --plan,
    one toy rung per array task, then --report-only fits what the tasks wrote."""
    out = tmp_path / "ladder"
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1")
    ladder = [PYTHON, "tools/scaling_ladder.py", "--out", str(out), "--toy"]
    plan = subprocess.run(
        [*ladder, "--plan"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert plan.returncode == 0, plan.stderr[-3000:]
    settings = {"OUT": str(out), "EXTRA_ARGS": "--toy", "PYTHON": PYTHON,
                "TORCHDYNAMO_DISABLE": "1", "OMP_NUM_THREADS": "1"}  # fmt: skip
    proc = cluster.cmd(
        [
            "sbatch", "--parsable", "--array=0-3", "--cpus-per-task=1", "--mem=0",
            f"--output={tmp_path}/ladder-%A_%a.out",
            "--export=" + ",".join(["ALL"] + [f"{k}={v}" for k, v in settings.items()]),
            str(SLURM_DIR / "scaling_ladder.sbatch"),
        ],
        cwd=ROOT,
    )  # fmt: skip
    job_id = proc.stdout.strip().split(";")[0]
    tasks = [Job(cluster, f"{job_id}_{i}", tmp_path / f"ladder-{job_id}_{i}.out") for i in range(4)]
    for task in tasks:
        state = task.wait(timeout=300)
        assert state == "COMPLETED", task.text()[-4000:]
        log = task.text()
        assert f"array task {task.id.split('_')[1]}" in log and "ladder exited with 0" in log
    names = ["transformer_r1", "transformer_r2", "hybrid_r1", "hybrid_r2"]
    assert all((out / "rungs" / f"{n}.json").exists() for n in names)
    report = subprocess.run(
        [*ladder, "--report-only", "--bootstrap", "50"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert report.returncode == 0, report.stdout[-3000:] + report.stderr[-3000:]
    doc = json.loads((out / "scaling_ladder.json").read_text())
    assert doc["pending"] == [] and set(doc["fits"]) == {"transformer", "hybrid"}
