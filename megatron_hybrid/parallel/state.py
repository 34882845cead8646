"""Start torch.distributed and megatron-core's model-parallel groups (NCCL on GPU, gloo on CPU)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from megatron_hybrid import mcore
from megatron_hybrid.errors import ConfigError
from megatron_hybrid.parallel.cpu_shim import install_cpu_shim


@dataclass(frozen=True)
class ParallelLayout:
    """Sizes of each parallel dimension; data parallel is whatever the world size leaves."""

    tensor: int = 1
    """Tensor-parallel size: splits heads and MLP columns; must divide every head count."""
    pipeline: int = 1
    """Pipeline-parallel size: splits the layer pattern into consecutive stages."""
    virtual_pipeline: int | None = None
    """Virtual stages per pipeline rank (interleaved schedule); None = not interleaved."""
    context: int = 1
    """Context-parallel size: splits the sequence."""
    sequence_parallel: bool = False
    """Shard norms/dropout activations along the sequence inside TP regions (needs tensor > 1)."""

    def data_parallel(self, world_size: int) -> int:
        model = self.tensor * self.pipeline * self.context
        if world_size % model:
            raise ValueError(
                f"world size {world_size} is not divisible by TP({self.tensor}) x "
                f"PP({self.pipeline}) x CP({self.context}) = {model}"
            )
        return world_size // model


def _env_from_slurm() -> None:
    """Under ``srun`` (one task per GPU) without torchrun, derive torch.distributed's variables
    from Slurm's. torchrun's own variables win when present."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ.get("SLURM_NTASKS", "1")
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    os.environ.setdefault(
        "LOCAL_WORLD_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0]
    )
    if "MASTER_ADDR" not in os.environ:
        nodes = os.environ.get("SLURM_JOB_NODELIST", "")
        if nodes:
            import subprocess

            try:
                first = subprocess.run(
                    ["scontrol", "show", "hostnames", nodes],
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout.split()[0]
                os.environ["MASTER_ADDR"] = first
            except (OSError, subprocess.CalledProcessError, IndexError):
                pass
    if "MASTER_PORT" not in os.environ and "SLURM_JOB_ID" in os.environ:
        os.environ["MASTER_PORT"] = str(15000 + int(os.environ["SLURM_JOB_ID"]) % 40000)


def _backend(cpu: bool) -> str:
    """gloo on CPU, NCCL on GPU. (Ranks sharing one GPU through gloo do not work: NCCL refuses
    two ranks on one device and gloo has no CUDA ``allreduce_coalesced``, which megatron's
    gradient reduction uses; seen on the H200, 2026-12-04.)"""
    return "gloo" if cpu else "nccl"


def _local_device(backend: str) -> int:
    """This rank's GPU: LOCAL_RANK. More ranks per node than GPUs is an error naming both."""
    local, count = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
    if local < count:
        return local
    if backend == "gloo":
        return local % count
    raise ConfigError(
        f"local rank {local} has no GPU: this node shows {count} GPU(s) to "
        f"{os.environ.get('LOCAL_WORLD_SIZE', '?')} ranks (--nproc-per-node / --ntasks-per-node "
        "must not exceed the GPUs per node)"
    )


def initialize(layout: ParallelLayout = ParallelLayout(), seed: int = 1234) -> None:
    """Initialise torch.distributed from the torchrun environment (or a 1-rank default).

    On CPU the megatron-core shim is installed first and the backend is gloo.
    """
    _env_from_slurm()
    cpu = not torch.cuda.is_available()
    if cpu:
        install_cpu_shim()
        if "OMP_NUM_THREADS" not in os.environ:
            # Oversubscribed OpenMP spin-waits make CPU runs 10x slower: share the cores
            # between the ranks on this machine.
            local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    if not torch.distributed.is_initialized():
        defaults = {"MASTER_ADDR": "127.0.0.1", "RANK": "0", "WORLD_SIZE": "1"}
        if "MASTER_PORT" not in os.environ:
            # A plain single-process run: any free port (several may run on one machine).
            import socket

            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                defaults["MASTER_PORT"] = str(sock.getsockname()[1])
        for key, value in defaults.items():
            if key not in os.environ:
                os.environ[key] = value
                _ENV_SET_HERE.append(key)
        rank = int(os.environ["RANK"])
        world = int(os.environ["WORLD_SIZE"])
        backend = _backend(cpu)
        if not cpu:
            torch.cuda.set_device(_local_device(backend))
        torch.distributed.init_process_group(backend=backend, rank=rank, world_size=world)
    world = torch.distributed.get_world_size()
    layout.data_parallel(world)  # raises with the numbers if impossible
    if mcore.parallel_state.model_parallel_is_initialized():
        mcore.parallel_state.destroy_model_parallel()
    mcore.parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tensor,
        pipeline_model_parallel_size=layout.pipeline,
        virtual_pipeline_model_parallel_size=layout.virtual_pipeline,
        context_parallel_size=layout.context,
    )
    set_seed(seed)


def set_seed(seed: int) -> None:
    """Seed torch and megatron's TP-aware RNG tracker (same seed on every rank for init)."""
    torch.manual_seed(seed)
    mcore.tensor_parallel.model_parallel_cuda_manual_seed(seed)


_ENV_SET_HERE: list[str] = []
"""Rendezvous variables ``initialize`` put into os.environ itself (a 1-rank run's defaults)."""


def destroy() -> None:
    """Tear the process groups down and take back the rendezvous variables ``initialize`` set:
    left behind, MASTER_PORT (still bound by this process's store) would be inherited by every
    later child of an in-process run (e.g. a test's subprocess or sbatch job) and make its
    rendezvous fail with EADDRINUSE, as a full test run showed on 2026-12-06."""
    if mcore.parallel_state.model_parallel_is_initialized():
        mcore.parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    while _ENV_SET_HERE:
        os.environ.pop(_ENV_SET_HERE.pop(), None)


def process_groups():
    """megatron-core's ProcessGroupCollection built from the initialised parallel state."""
    return mcore.ProcessGroupCollection.use_mpu_process_groups()
