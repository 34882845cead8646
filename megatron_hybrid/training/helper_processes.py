"""Helper processes of a training rank must not outlive it.

megatron's checkpoint writer serves its results queue from a multiprocessing Manager process
(started at setup, see ``Trainer._install_signal_handlers``). That process ignores SIGTERM and
SIGUSR1 on purpose, so a Slurm/torchrun SIGTERM that asks the rank to save cannot kill it in the
middle of that save; but then nothing stopped it when the rank itself died (SIGKILL, an abort in
a collective, an OOM kill): it stayed forever, holding the multiprocessing resource tracker
alive with it. Linux's parent-death signal closes the gap: the helper gets SIGKILL the moment
its rank exits, however the rank exits. This module is imported by the spawned helper, so it
imports nothing heavy.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """Run in the helper process at start: SIGKILL when the parent exits; exit now if it
    already has (the fork-to-prctl race)."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass  # no prctl: best effort, as before
    if os.getppid() != parent_pid:
        os._exit(0)


def checkpoint_writer_helper_init(parent_pid: int) -> None:
    """Initializer of the checkpoint writer's Manager process (see the module doc)."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    die_with_parent(parent_pid)
