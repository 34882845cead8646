"""A real one-node Slurm cluster on localhost (munged + slurmctld + slurmd), for the tests.

Everything lives under one directory (config, munge key and socket, state, spool, logs); the
daemons run as root in the background and every Slurm command is pointed at the config through
``SLURM_CONF``. Installs Debian's ``slurm-wlm`` and ``munge`` with apt-get when ``sbatch`` is
missing (CI: a fresh Debian container, as root).

Manual use (from the repo root, as root):

    python -m tests.slurm.localslurm up /tmp/slurm     # prints the `export SLURM_CONF=...` line
    SLURM_CONF=/tmp/slurm/slurm.conf sbatch ...
    python -m tests.slurm.localslurm down /tmp/slurm
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

SLURM_PACKAGES = ["slurm-wlm", "munge"]
# Fake GPUs so scripts with `#SBATCH --gpus-per-node=8` run unchanged: Slurm drops file-less GPUs
# and wants character devices, so each "GPU" is a symlink to /dev/null (bookkeeping only).
FAKE_GPUS = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def install_reason() -> str | None:
    """Make sure slurmctld/slurmd/sbatch/munged exist; None if they do, else why not."""
    tools = ["sbatch", "slurmctld", "slurmd", "munged", "mungekey"]
    if all(shutil.which(t) for t in tools):
        return None
    if os.geteuid() != 0:
        return "Slurm is not installed and installing it needs root"
    if not shutil.which("apt-get"):
        return "Slurm is not installed and there is no apt-get to install slurm-wlm"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (
        ["apt-get", "update"],
        ["apt-get", "install", "-y", "--no-install-recommends", *SLURM_PACKAGES],
    ):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if proc.returncode:
            return f"`{' '.join(cmd)}` failed: {(proc.stderr or proc.stdout)[-800:]}"
    missing = [t for t in tools if not shutil.which(t)]
    return f"installed {SLURM_PACKAGES} but {missing} are still missing" if missing else None


def _ensure_hostname_resolves(host: str) -> None:
    """torchrun's --master-addr is the node name: it must resolve (fresh containers may not)."""
    try:
        socket.gethostbyname(host)
    except OSError:
        with open("/etc/hosts", "a") as f:
            f.write(f"\n127.0.0.1 {host}\n")


class LocalSlurm:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()
        self.conf = self.root / "slurm.conf"
        self.host = socket.gethostname().split(".")[0]
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    # ---- configuration -----------------------------------------------------------------------
    def write_config(self) -> None:
        r = self.root
        for d in ("state", "spool", "log"):
            (r / d).mkdir(parents=True, exist_ok=True)
        os.chmod(r, 0o755)  # munge wants its socket's directory searchable by everyone
        cpus = os.cpu_count() or 1
        self.conf.write_text(
            f"""# one-node cluster on localhost for tests/slurm (written by localslurm.py)
ClusterName=localtest
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={r}/munge.sock,cred_expire=10
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1
ReturnToService=2
JobRequeue=1
# The scripts use MASTER_PORT = 15000 + job id % 40000: start the ids at a free port so that two
# test clusters on one machine (concurrent test runs) do not hand out the same ports.
FirstJobId={max(1, _free_port() - 15000)}
KillWait=30
MinJobAge=300
MailProg=/bin/true
GresTypes=gpu
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={cpus} Gres=gpu:{FAKE_GPUS} State=UNKNOWN
PartitionName=cpu Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""
        )
        for i in range(FAKE_GPUS):
            dev = r / f"fakegpu{i}"
            if not dev.is_symlink():
                dev.symlink_to("/dev/null")
        (r / "gres.conf").write_text(
            f"NodeName={self.host} Name=gpu File={r}/fakegpu[0-{FAKE_GPUS - 1}]\n"
        )
        # No cgroup plugin is used (proctrack/linuxproc, task/none); slurmd still reads this.
        (r / "cgroup.conf").write_text("CgroupPlugin=autodetect\nIgnoreSystemd=yes\n")

    # ---- daemons -----------------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> None:
        _ensure_hostname_resolves(self.host)
        self.write_config()
        r = self.root
        key = r / "munge.key"
        if not key.exists():
            subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True)
        subprocess.run(
            [
                "munged",
                "--force",
                f"--socket={r}/munge.sock",
                f"--key-file={key}",
                f"--pid-file={r}/munged.pid",
                f"--seed-file={r}/munged.seed",
                f"--log-file={r}/log/munged.log",
            ],
            check=True,
        )
        # slurmctld -i: ignore any saved state (fresh cluster); both daemons fork into the
        # background and write their pid files.
        subprocess.run(["slurmctld", "-i", "-f", str(self.conf)], env=self.env, check=True)
        subprocess.run(["slurmd", "-f", str(self.conf)], env=self.env, check=True)
        self.wait_idle(timeout)

    def wait_idle(self, timeout: float = 60.0) -> None:
        deadline = time.time() + timeout
        state = ""
        while time.time() < deadline:
            proc = self.cmd(["sinfo", "-h", "-N", "-o", "%T"], check=False)
            state = proc.stdout.strip()
            if state in ("idle", "mixed", "allocated"):
                return
            time.sleep(0.5)
        raise RuntimeError(f"node not idle after {timeout}s (state {state!r})\n{self.logs()}")

    def stop(self) -> None:
        for name in ("slurmd", "slurmctld", "munged"):
            pidfile = self.root / f"{name}.pid"
            try:
                pid = int(pidfile.read_text().strip())
            except (OSError, ValueError):
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            for _ in range(50):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            else:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    # ---- helpers -----------------------------------------------------------------------------
    def cmd(self, args: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            args, env=kw.pop("env", self.env), capture_output=True, text=True, **kw
        )
        if check and proc.returncode:
            raise RuntimeError(f"{' '.join(args)} -> {proc.returncode}\n{proc.stdout}{proc.stderr}")
        return proc

    def job_field(self, job_id: str, field: str) -> str | None:
        """A field of `scontrol show job` (e.g. JobState, Restarts), None once the job is gone."""
        proc = self.cmd(["scontrol", "-o", "show", "job", job_id], check=False)
        if proc.returncode:
            return None
        for tok in proc.stdout.split():
            k, _, v = tok.partition("=")
            if k == field:
                return v
        return None

    def logs(self) -> str:
        out = []
        for f in sorted((self.root / "log").glob("*.log")):
            out.append(f"--- {f.name} (tail)\n" + "\n".join(f.read_text().splitlines()[-30:]))
        return "\n".join(out)


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("up", "down"):
        print(__doc__)
        return 2
    cluster = LocalSlurm(argv[1])
    if argv[0] == "down":
        cluster.stop()
        return 0
    reason = install_reason()
    if reason:
        print(reason, file=sys.stderr)
        return 1
    cluster.root.mkdir(parents=True, exist_ok=True)
    cluster.start()
    print(f"export SLURM_CONF={cluster.conf}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
