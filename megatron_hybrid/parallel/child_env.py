"""The environment of a child process that starts a process group of its own.

torch.distributed's ``env://`` rendezvous reads MASTER_ADDR / MASTER_PORT / RANK / WORLD_SIZE from
the environment, and ``parallel.state.initialize`` writes MASTER_PORT into it. A child started
from a process that already joined a group (a test, a worker pool) would inherit that port, still
bound by the parent, and fail with EADDRINUSE, or join the parent's world. So such children get
the environment without these variables and choose their own.
"""

from __future__ import annotations

from collections.abc import Mapping

RENDEZVOUS_VARS = frozenset(
    {"MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"}
)


def without_rendezvous(env: Mapping[str, str]) -> dict[str, str]:
    """A copy of ``env`` without torch.distributed's rendezvous variables."""
    return {k: v for k, v in env.items() if k not in RENDEZVOUS_VARS}
