"""Checkpoints in megatron-core's dist-checkpointing format (torch_dist), Megatron's layout.

    <save>/iter_0000100/                  one checkpoint (model, optimizer, scheduler, RNG, data
                                          position, run config as run_config.json)
    <save>/latest_checkpointed_iteration.txt

A *weights-only* checkpoint (``save_weights_only``, e.g. imported from HF by
tools/convert_from_hf.py) holds the model and ``train_state = {"weights_only": true, ...}``; loading
it restores the weights and leaves optimizer, LR schedule and RNG fresh (training starts at its
iteration, normally 0).

A save writes ``iter_XXXXXXX.tmp`` first and renames it when every rank has finished; the tracker
file is replaced atomically last. A crash at any point leaves the previous checkpoint and the
tracker pointing at it intact. Weights are sharded tensors keyed by global layer number, so a
checkpoint loads at another TP/PP layout (megatron reshards on load).
"""

from __future__ import annotations

import json
import os
import random
import shutil

import numpy as np
import torch
import torch.distributed as dist

from megatron_hybrid import mcore

TRACKER = "latest_checkpointed_iteration.txt"
OPTIM_META = {"distrib_optim_sharding_type": "fully_reshardable"}


class CheckpointError(RuntimeError):
    pass


def _crash_in_save() -> set[int]:
    from megatron_hybrid.training.loop import _fault_iterations

    return _fault_iterations("crash_in_save")


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def latest_iteration(root: str) -> int | None:
    path = os.path.join(root, TRACKER)
    if not os.path.isfile(path):
        return None
    text = open(path).read().strip()
    try:
        return int(text)
    except ValueError:
        raise CheckpointError(f"{path}: expected an iteration number, found {text!r}") from None


def unwrap(module):
    """The HybridModel inside DDP / Float16Module wrappers (checkpoint keys carry no wrapper
    prefixes, so conversion tools and other layouts see plain model names)."""
    while hasattr(module, "module"):
        module = module.module
    return module


def _model_sharded_state_dict(chunks) -> dict:
    if len(chunks) == 1:
        return {"model": unwrap(chunks[0]).sharded_state_dict()}
    return {f"model{i}": unwrap(c).sharded_state_dict() for i, c in enumerate(chunks)}


def _rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
        state["tracker"] = mcore.tensor_parallel.get_cuda_rng_tracker().get_states()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
        mcore.tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_object(world: int, rank: int, data=None):
    return mcore.ShardedObject("rng_state", data, (world,), (rank,), replica_id=0)


_GROUP_HYPERPARAMS = ("max_lr", "min_lr", "start_wd", "end_wd")


def _align_param_groups(saved, optimizer) -> None:
    """megatron matches saved param groups to current ones by their hyper-parameters (max_lr,
    min_lr, ...), so resuming with a changed --lr/--min-lr fails with an opaque error. The
    *current* run's schedule is what the user asked for: copy its values into the saved groups
    (matched by their weight-decay / LR multipliers), keeping every per-parameter state."""
    current = {}
    for g in optimizer.param_groups:
        current[(g.get("wd_mult", 1.0), g.get("lr_mult", 1.0))] = g

    def walk(obj):
        if isinstance(obj, dict):
            groups = obj.get("param_groups")
            if isinstance(groups, list):
                for g in groups:
                    if isinstance(g, dict) and "max_lr" in g:
                        cur = current.get((g.get("wd_mult", 1.0), g.get("lr_mult", 1.0)))
                        if cur is not None:
                            for k in _GROUP_HYPERPARAMS:
                                if k in cur:
                                    g[k] = cur[k]
            for v in obj.values():
                walk(v)
        elif isinstance(obj, list):
            for v in obj:
                walk(v)

    walk(saved)


def _prepare(root: str, iteration: int) -> tuple[str, str]:
    """Fresh ``iter_N.tmp`` for a save (all ranks wait for it)."""
    final = iteration_dir(root, iteration)
    tmp = final + ".tmp"
    if dist.get_rank() == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    return final, tmp


def _publish(root: str, iteration: int, tmp: str, final: str, run_dict: dict) -> str:
    """After every rank wrote its shards into ``tmp``: config, rename, then the tracker —
    atomically, in that order, so a crash at any point leaves the previous checkpoint current."""
    if dist.get_rank() == 0:
        with open(os.path.join(tmp, "run_config.json"), "w") as f:
            json.dump(run_dict, f, indent=2, default=str)
        if os.path.exists(final):  # re-saving the same iteration: keep the old one until now
            shutil.rmtree(final)
        os.replace(tmp, final)
        tracker_tmp = os.path.join(root, TRACKER + ".tmp")
        with open(tracker_tmp, "w") as f:
            f.write(str(iteration))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tracker_tmp, os.path.join(root, TRACKER))
    dist.barrier()
    return final


def save_checkpoint(
    root: str, iteration: int, chunks, optimizer, scheduler, run_dict: dict, train_state: dict
) -> str:
    rank, world = dist.get_rank(), dist.get_world_size()
    final, tmp = _prepare(root, iteration)
    model_sd = _model_sharded_state_dict(chunks)
    sd = dict(model_sd)
    sd["optimizer"] = optimizer.sharded_state_dict(model_sd, metadata=OPTIM_META)
    sd["scheduler"] = scheduler.state_dict()
    sd["train_state"] = dict(train_state)
    sd["world_size"] = world
    sd["rng_state"] = _rng_object(world, rank, _rng_state())
    mcore.dist_checkpointing.save(
        sharded_state_dict=sd, checkpoint_dir=tmp, content_metadata=OPTIM_META
    )
    dist.barrier()
    if iteration in _crash_in_save():
        # Test hook: a hard crash after the shards are written, before the rename. The whole
        # process group goes (megatron's checkpoint writer processes included).
        import signal

        os.killpg(os.getpgid(0), signal.SIGKILL)
    return _publish(root, iteration, tmp, final, run_dict)


def save_weights_only(
    root: str, iteration: int, chunks, run_dict: dict, train_state: dict | None = None
) -> str:
    """Save only the model (no optimizer, scheduler or RNG): a checkpoint that ``--load`` starts
    from with a fresh optimizer and schedule. Same layout, atomic rename and tracker as
    ``save_checkpoint``; any parallel layout (dist checkpoints reshard on load)."""
    world = dist.get_world_size()
    final, tmp = _prepare(root, iteration)
    sd = _model_sharded_state_dict(chunks)
    state = {"consumed_samples": 0, "skipped": 0, "nan_iterations": 0}
    state.update(train_state or {})
    state["weights_only"] = True
    sd["train_state"] = state
    sd["world_size"] = world
    mcore.dist_checkpointing.save(sharded_state_dict=sd, checkpoint_dir=tmp)
    dist.barrier()
    return _publish(root, iteration, tmp, final, run_dict)


def load_model_only(path: str, chunks) -> None:
    """Load just the model weights of the checkpoint in ``path`` (an ``iter_N`` directory, full or
    weights-only, saved at any layout) into ``chunks``. Transformer Engine's per-module
    ``_extra_state`` (FP8 metadata) is neither read nor required."""
    model_sd = _model_sharded_state_dict(chunks)
    sd = {
        name: {k: v for k, v in part.items() if not k.endswith("_extra_state")}
        for name, part in model_sd.items()
    }
    try:
        state = mcore.dist_checkpointing.load(sharded_state_dict=sd, checkpoint_dir=path)
    except Exception as e:
        raise CheckpointError(f"cannot load {path}: {type(e).__name__}: {str(e)[:500]}") from e
    for name, c in zip(sd, chunks, strict=True):
        missing, unexpected = unwrap(c).load_state_dict(state[name], strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise CheckpointError(
                f"{path}: model weights do not match: missing {missing[:3]}, "
                f"unexpected {unexpected[:3]}"
            )


def _refresh_main_params(optimizer) -> None:
    """Mixed precision keeps fp32 main copies of the parameters, made when the optimizer was
    built: refresh them after loading weights without optimizer state (as Megatron-LM does for
    --no-load-optim)."""
    if optimizer is not None:
        optimizer.reload_model_params()


def _load_weights_only(path: str, chunks, optimizer, common: dict, iteration: int) -> dict:
    """Weights-only checkpoint: optimizer state, LR schedule and RNG stay as built (fresh)."""
    load_model_only(path, chunks)
    _refresh_main_params(optimizer)
    return dict(common["train_state"], iteration=iteration)


def load_weights_only(root: str, chunks, optimizer) -> str | None:
    """``--finetune``: the model weights of ``root``'s latest checkpoint (full or weights-only,
    any layout) and nothing else. Returns the directory read, or None when there is none."""
    iteration = latest_iteration(root)
    if iteration is None:
        return None
    path = iteration_dir(root, iteration)
    load_model_only(path, chunks)
    _refresh_main_params(optimizer)
    return path


def _check_optimizer_kind(path: str, optimizer) -> None:
    """The distributed optimizer stores its states sharded over DP in its own format; megatron
    cannot read them into the plain optimizer or the other way round."""
    try:
        with open(os.path.join(path, "run_config.json")) as f:
            saved = json.load(f).get("parallel", {}).get("distributed_optimizer")
    except (OSError, ValueError):
        return
    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    now = any(type(o).__name__ == "DistributedOptimizer" for o in parts)
    if saved is not None and bool(saved) != now:
        flag = "with" if saved else "without"
        raise CheckpointError(
            f"{path} was saved {flag} --use-distributed-optimizer and its optimizer states are "
            f"stored in that format: resume {flag} it, or add --no-load-optim to keep weights, LR schedule and data "
            "position and start the optimizer states fresh"
        )


def load_checkpoint(
    root: str,
    chunks,
    optimizer,
    scheduler,
    iteration: int | None = None,
    load_optimizer: bool = True,
) -> dict | None:
    """Restore in place; returns the saved train_state, or None when ``root`` has no checkpoint."""
    if iteration is None:
        iteration = latest_iteration(root)
        if iteration is None:
            return None
    path = iteration_dir(root, iteration)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} does not exist (tracker says iteration {iteration})")
    common = mcore.dist_checkpointing.load_common_state_dict(path)
    if common.get("train_state", {}).get("weights_only"):
        return _load_weights_only(path, chunks, optimizer, common, iteration)
    rank, world = dist.get_rank(), dist.get_world_size()
    model_sd = _model_sharded_state_dict(chunks)
    sd = dict(model_sd)
    if load_optimizer and optimizer is not None:
        _check_optimizer_kind(path, optimizer)
        sd["optimizer"] = optimizer.sharded_state_dict(
            model_sd, is_loading=True, metadata=OPTIM_META
        )
    same_layout = common.get("world_size") == world
    if same_layout:
        sd["rng_state"] = _rng_object(world, rank)
    try:
        state = mcore.dist_checkpointing.load(sharded_state_dict=sd, checkpoint_dir=path)
    except Exception as e:
        raise CheckpointError(f"cannot load {path}: {type(e).__name__}: {str(e)[:500]}") from e
    if len(chunks) == 1:
        unwrap(chunks[0]).load_state_dict(state["model"])
    else:
        for i, c in enumerate(chunks):
            unwrap(c).load_state_dict(state[f"model{i}"])
    if load_optimizer and optimizer is not None:
        _align_param_groups(state["optimizer"], optimizer)
        optimizer.load_state_dict(state["optimizer"])
    else:
        _refresh_main_params(optimizer)
    if scheduler is not None:
        scheduler.load_state_dict(common["scheduler"])
    if same_layout:
        _set_rng_state(state["rng_state"])
    return dict(common["train_state"], iteration=iteration)
