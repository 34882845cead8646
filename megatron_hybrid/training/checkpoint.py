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

Nothing silent on load: ``--load`` must name a checkpoint (or be the ``--save`` directory of a
first run), every file is checked against the ``checksums.sha256`` manifest written at save time,
the saved model architecture must equal the run's, every tensor must match (none missing, none
extra, same shapes) and the loaded weights must be finite. Every failure is a ``CheckpointError``
naming the directory or file.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import re
import shutil
import sys

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from megatron_hybrid import mcore
from megatron_hybrid.training.faults import fault_iterations
from megatron_hybrid.training.optimizer_step import fp8_weight_cast_rowwise_only

TRACKER = "latest_checkpointed_iteration.txt"
OPTIM_META = {"distrib_optim_sharding_type": "fully_reshardable"}


MANIFEST = "checksums.sha256"
_ITER_DIR = re.compile(r"iter_(\d{7})")

# The fields of the model section that decide which tensors exist and their shapes (plus the
# beta range, which gives the same weights another meaning): a saved run's must equal the new
# run's. rope_theta / max_position_embeddings / eps / init change legitimately between stages.
ARCHITECTURE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_layers",
    "block_types",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "gdn_num_heads",
    "gdn_head_k_dim",
    "gdn_head_v_dim",
    "gdn_conv_kernel",
    "gdn_allow_neg_eigval",
    "tie_word_embeddings",
)


class CheckpointError(RuntimeError):
    pass


class DamagedCheckpoint(CheckpointError):
    """Files that cannot be read or hold non-finite weights (not a mismatch of configurations)."""


def _one_line(e: BaseException) -> str:
    """A failure as ``Type: first line``. torch's CheckpointException puts every rank's traceback
    into str(): report the first rank's original exception instead."""
    if isinstance(e, CheckpointException) and e.failures:
        inner = next(iter(e.failures.values()))
        return _one_line(inner[0] if isinstance(inner, tuple) else inner)
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:300]}" if lines else type(e).__name__


@contextlib.contextmanager
def reading(path: str):
    """Any failure of megatron/torch while reading ``path`` -> one CheckpointError naming it.
    torch's CheckpointException derives from BaseException, so ``except Exception`` misses it."""
    try:
        yield
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as e:
        raise DamagedCheckpoint(
            f"cannot load checkpoint {path} (corrupt, truncated or incomplete files?): "
            f"{_one_line(e)}"
        ) from None


def _warn_once(message: str, _seen: set = set()) -> None:  # noqa: B006 (the set is the memory)
    if message not in _seen and (not dist.is_initialized() or dist.get_rank() == 0):
        _seen.add(message)
        print(f"warning: {message}", file=sys.stderr, flush=True)


def _crash_in_save() -> set[int]:
    return fault_iterations("crash_in_save")


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


def resolve_load(load: str, save: str | None = None) -> str | None:
    """The ``iter_N`` directory ``--load`` names, or None for a first run of the requeue pattern
    (``--load X --save X`` with nothing in X yet). Anything else without a checkpoint is an error:
    starting from random weights when the user asked to resume is never what they meant.

    ``--load .../iter_0000010`` (an iteration directory itself) loads exactly that iteration."""
    if os.path.isfile(load):
        raise CheckpointError(f"--load {load} is a file, not a checkpoint directory")
    if _ITER_DIR.fullmatch(os.path.basename(os.path.normpath(load))):
        if not os.path.isfile(os.path.join(load, "metadata.json")):
            raise CheckpointError(f"--load {load}: not a complete checkpoint (no metadata.json)")
        return load
    if os.path.basename(os.path.normpath(load)).endswith(".tmp"):
        raise CheckpointError(f"--load {load} is an unfinished save; load its parent directory")
    first_run = save is not None and os.path.abspath(save) == os.path.abspath(load)
    if not os.path.isdir(load):
        if first_run:
            return None
        raise CheckpointError(f"--load {load}: no such directory")
    iteration = latest_iteration(load)
    if iteration is not None:
        path = iteration_dir(load, iteration)
        if not os.path.isdir(path):
            raise CheckpointError(f"{path} does not exist (tracker says iteration {iteration})")
        return path
    # A crash between the rename and the tracker leaves a complete iter_N without a tracker:
    # never start over on top of it, name it.
    done = sorted(d for d in os.listdir(load) if _ITER_DIR.fullmatch(d))
    if done:
        raise CheckpointError(
            f"--load {load} has no {TRACKER} but holds {done[-1]}: give --load "
            f"{os.path.join(load, done[-1])} to resume from it"
        )
    if first_run:
        return None
    raise CheckpointError(f"--load {load} holds no checkpoint (no {TRACKER})")


def iteration_of(path: str) -> int:
    m = _ITER_DIR.fullmatch(os.path.basename(os.path.normpath(path)))
    if m is None:
        raise CheckpointError(f"{path}: not an iter_NNNNNNN checkpoint directory")
    return int(m.group(1))


# ---- checksums --------------------------------------------------------------------------------
# sha256 (hashlib, OpenSSL): ~1.5 GB/s per core with SHA-NI, within 2x of zlib.crc32, no false
# "OK" on any corruption, and the manifest is sha256sum's format (`sha256sum -c checksums.sha256`
# in the directory checks it by hand). Hashing is spread over the ranks, one file each in turn.


def _sha256(path: str) -> str | None:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(16 << 20):
                h.update(chunk)
    except OSError:
        return None
    return h.hexdigest()


def _hash_files(directory: str, names: list[str]) -> dict[str, str | None]:
    """name -> sha256 (None if unreadable); each rank hashes every world-th file (collective when
    torch.distributed is initialised: all ranks must call it with the same names)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return {n: _sha256(os.path.join(directory, n)) for n in names}
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = {n: _sha256(os.path.join(directory, n)) for n in names[rank::world]}
    parts = [None] * world
    dist.all_gather_object(parts, mine)
    return {k: v for part in parts for k, v in part.items()}


def _checkpoint_files(directory: str) -> list[str]:
    """Every file of a checkpoint directory, as all ranks see it (rank 0 lists)."""
    names = [None]
    if not dist.is_initialized() or dist.get_rank() == 0:
        names = [sorted(n for n in os.listdir(directory) if n != MANIFEST)]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(names, src=0)
    return names[0]


def _write_manifest(directory: str, sums: dict[str, str | None]) -> None:
    lines = "".join(f"{sums[n]}  {n}\n" for n in sorted(sums))
    with open(os.path.join(directory, MANIFEST), "w") as f:
        f.write(lines)
        f.flush()
        os.fsync(f.fileno())


def _read_manifest(path: str) -> dict[str, str]:
    out = {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            digest, _, name = line.rstrip("\n").partition("  ")
            if len(digest) != 64 or not name:
                raise CheckpointError(f"{path}: line {n} is not '<sha256>  <file>'")
            out[name] = digest
    return out


def verify_checksums(path: str) -> None:
    """Every file listed in ``path``'s manifest must exist with its recorded sha256. Checkpoints
    saved before manifests existed load with one warning. Collective under torch.distributed."""
    manifest = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest):
        _warn_once(f"{path} has no {MANIFEST} (saved without checksums): files not verified")
        return
    with reading(manifest):
        expected = _read_manifest(manifest)
    got = _hash_files(path, sorted(expected))
    missing = [n for n in sorted(expected) if got[n] is None]
    if missing:
        raise CheckpointError(f"{path}: missing or unreadable checkpoint files: {missing}")
    bad = [n for n in sorted(expected) if got[n] != expected[n]]
    if bad:
        raise CheckpointError(
            f"{path}: checksum mismatch in {', '.join(os.path.join(path, n) for n in bad)} "
            f"(corrupt or changed since the save; {MANIFEST} records the saved sha256)"
        )


# ---- the saved model must be the run's --------------------------------------------------------


def _normalised(value):
    return json.loads(json.dumps(value, default=str))


def check_architecture(path: str, model_cfg) -> None:
    """Compare the checkpoint's saved model architecture with the run's before reading any
    tensor, naming every differing field (megatron would otherwise load a prefix of the layers)."""
    f = os.path.join(path, "run_config.json")
    if not os.path.isfile(f):
        return  # checkpoints of other tools: the strict tensor check still applies
    with reading(f), open(f) as fh:
        saved = json.load(fh).get("model") or {}
    now = _normalised(model_cfg.to_dict())
    diff = [
        f"{k} {saved[k]} -> {now.get(k)}"
        for k in ARCHITECTURE_FIELDS
        if k in saved and _normalised(saved[k]) != now.get(k)
    ]
    if diff:
        raise CheckpointError(
            f"{path} holds another model architecture than this run's (saved -> now): "
            f"{'; '.join(diff)}"
        )


def _strict_load(path: str, sd: dict, requested_prefixes: tuple[str, ...]) -> dict:
    """``dist_checkpointing.load`` that names every tensor missing from the checkpoint and every
    checkpoint tensor the model has no place for (megatron's default drops the latter silently).
    ``requested_prefixes``: the checkpoint key prefixes this load reads deliberately (a
    weights-only load leaves the optimizer's keys alone); TE's ``_extra_state`` is never needed."""
    _check_complete(path)
    _raise_on_any_rank(path, _shape_mismatches(path, sd), "tensors of another shape (saved -> now)")
    with reading(path):
        state, missing, unexpected = mcore.dist_checkpointing.load(
            sharded_state_dict=sd,
            checkpoint_dir=path,
            strict=mcore.dist_checkpointing.validation.StrictHandling.RETURN_ALL,
        )
    # "unexpected" (requested, not in the checkpoint) differs per rank: every rank must see the
    # same verdict, or the clean ones go on to the next collective and hang.
    parts = [set(unexpected)]
    if dist.is_initialized() and dist.get_world_size() > 1:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, set(unexpected))
    absent = sorted(set().union(*parts))
    extra = sorted(
        k
        for k in missing
        if not k.endswith("_extra_state")
        and (not k.startswith(("optimizer.", "rng_state")) or k.startswith(requested_prefixes))
    )
    if absent or extra:
        why = []
        if absent:
            why.append(f"{len(absent)} tensors of this model are not in it: {_few(absent)}")
        if extra:
            why.append(f"{len(extra)} of its tensors have no place in this model: {_few(extra)}")
        raise CheckpointError(f"{path} does not match the model: {'; '.join(why)}")
    return state


def _check_complete(path: str) -> None:
    """torch reports a missing index file as ``AssertionError: metadata is None``: name it."""
    for name in (".metadata", "metadata.json"):
        if not os.path.isfile(os.path.join(path, name)):
            raise DamagedCheckpoint(
                f"{os.path.join(path, name)} is missing (incomplete checkpoint)"
            )


def _shape_mismatches(path: str, sd: dict) -> list[str]:
    """Model tensors whose global shape differs from the saved one, checked before any tensor is
    read (megatron would fail inside the read, per rank, with less to go on)."""
    with reading(path):
        meta = mcore.dist_checkpointing.load_tensors_metadata(path)
    dc = mcore.dist_checkpointing
    out = []
    for name, part in sd.items():
        if not name.startswith("model"):
            continue
        for t in dc.dict_utils.nested_values(part):
            if isinstance(t, dc.mapping.ShardedTensor) and t.key in meta:
                saved, now = tuple(meta[t.key].global_shape), tuple(t.global_shape)
                if saved != now:
                    out.append(f"{t.key} {list(saved)} -> {list(now)}")
    return out


def _raise_on_any_rank(path: str, problems: list[str], what: str) -> None:
    """Raise on every rank when any rank found ``problems`` (a rank that went on alone would hang
    in the next collective)."""
    parts = [problems]
    if dist.is_initialized() and dist.get_world_size() > 1:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, problems)
    found = sorted(set().union(*map(set, parts)))
    if found:
        raise CheckpointError(f"{path}: {len(found)} {what}: {_few(found)}")


def _natural(key: str) -> list:
    """decoder.layers.9 before decoder.layers.10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def _few(keys: list[str], n: int = 8) -> str:
    keys = sorted(keys, key=_natural)
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def check_finite(path: str, chunks) -> None:
    """NaN/inf in the loaded weights (a corrupt file read without checksums, or a diverged run's
    save): stop here, naming the parameters, rather than train on them. One pass over the local
    parameters and one small all-gather."""
    bad = [
        name
        for c in chunks
        for name, p in unwrap(c).named_parameters()
        if not bool(torch.isfinite(p.detach()).all())
    ]
    parts = [bad]
    if dist.is_initialized() and dist.get_world_size() > 1:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, bad)
    names = sorted(set().union(*map(set, parts)))
    if names:
        raise DamagedCheckpoint(f"{path}: NaN/inf in the loaded weights of {_few(names)}")


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
    """After every rank wrote its shards into ``tmp``: config, checksums, rename, then the
    tracker — atomically, in that order, so a crash at any point leaves the previous checkpoint
    current (and a published checkpoint always has its manifest)."""
    sums = _hash_files(tmp, _checkpoint_files(tmp))  # all ranks share the reading
    if dist.get_rank() == 0:
        config = os.path.join(tmp, "run_config.json")
        with open(config, "w") as f:
            json.dump(run_dict, f, indent=2, default=str)
        sums["run_config.json"] = _sha256(config)
        _write_manifest(tmp, sums)
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


def prune_checkpoints(root: str, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` published ``iter_*`` directories under ``root`` (rank 0
    only; never the one the tracker names). Returns the deleted paths."""
    if dist.get_rank() != 0:
        return []
    current = latest_iteration(root)
    names = sorted(n for n in os.listdir(root) if _ITER_DIR.fullmatch(n))
    doomed = [n for n in names[: max(0, len(names) - keep)] if n != f"iter_{current:07d}"]
    for n in doomed:
        shutil.rmtree(os.path.join(root, n), ignore_errors=True)
    return [os.path.join(root, n) for n in doomed]


def save_checkpoint(
    root: str, iteration: int, chunks, optimizer, scheduler, run_dict: dict, train_state: dict
) -> str:
    rank, world = dist.get_rank(), dist.get_world_size()
    final, tmp = _prepare(root, iteration)
    if iteration in fault_iterations("nan_in_save"):
        # Test hook: NaN weights in the saved model (what the trainer must refuse to load).
        with torch.no_grad():
            next(unwrap(chunks[0]).parameters()).fill_(float("nan"))
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
    weights-only, saved at any layout) into ``chunks``, strictly: every model tensor must be in
    the checkpoint with its shape, and every model tensor of the checkpoint must have a place.
    Transformer Engine's per-module ``_extra_state`` (FP8 metadata) is neither read nor required."""
    model_sd = _model_sharded_state_dict(chunks)
    sd = {
        name: {k: v for k, v in part.items() if not k.endswith("_extra_state")}
        for name, part in model_sd.items()
    }
    state = _strict_load(path, sd, requested_prefixes=())
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


def _recast_fp8_weights(optimizer, chunks) -> None:
    """With FP8 weights (``--fp8-param-gather``): cast the model's FP8 parameters again from the
    fp32 master weights just loaded, as the optimizer does after every step.

    Why (suspected, to be confirmed on a GPU by tests/gpu/test_fp8.py::
    test_fp8_param_gather_trains_and_resumes): the model's own load sets each FP8 weight by
    quantizing its saved value, possibly with the scale in effect before TE's FP8 state is
    restored, while the run that saved the checkpoint had cast it from the master weight; the
    two can differ in the last FP8 bit. Without this the H100 showed a resumed run's loss 1e-4
    off the uninterrupted one's at the next step. Then megatron's parameter all-gather (and its
    post-processing: the transposes)."""
    parts = [
        p
        for p in getattr(optimizer, "chained_optimizers", [optimizer])
        if getattr(getattr(p, "ddp_config", None), "fp8_param_gather", False)
    ]
    if not parts:
        return
    with fp8_weight_cast_rowwise_only(optimizer):
        for part in parts:
            part._copy_main_params_to_model_params()
    for chunk in chunks:
        chunk.start_param_sync(force_sync=True)


def load_weights_only(path: str, chunks, optimizer) -> None:
    """The model weights of checkpoint ``path`` (full or weights-only, any layout) and nothing
    else: optimizer state, LR schedule and RNG stay as built (fresh)."""
    load_model_only(path, chunks)
    _refresh_main_params(optimizer)


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


# ---- Transformer Engine FP8 state (``_extra_state``) ------------------------------------------
# Every TE module (te spec) saves an ``_extra_state`` object. It is empty except under the FP8
# *delayed* recipe, whose per-module scales and amax histories it carries as a Python pickle;
# TE >= 2.20 refuses to unpickle that on load unless NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE=1 (a
# pickle can run code). Resuming needs it, so a load here:
# - into a run that is not FP8-delayed (bf16, tensorwise, blockwise): replaces every payload by
#   the empty one TE skips (scales are not state in those runs; a bf16 run has none);
# - into an FP8-delayed run: first decodes each payload with megatron-core's restricted unpickler
#   for FP8 extra state (``megatron.core.safe_globals.SafeUnpickler``: plain containers, tensors,
#   TE/megatron recipe objects; no code can run), then lets TE load exactly those bytes with the
#   opt-in switched on for that call only. Anything else is a CheckpointError.
# A bf16 checkpoint into an FP8-delayed run: empty payloads, fresh amax histories.
UNSAFE_EXTRA_STATE_ENV = "NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE"


def check_extra_state_payload(key: str, value) -> None:
    """Raise CheckpointError unless ``value`` (a TE ``_extra_state``) is empty or decodes with the
    restricted unpickler (megatron's allow-list: tensors and TE/megatron recipe objects)."""
    if value is None or (isinstance(value, torch.Tensor) and value.numel() == 0):
        return
    if not isinstance(value, torch.Tensor):
        raise CheckpointError(f"{key}: unexpected Transformer Engine extra state {type(value)}")
    try:
        mcore.SafeUnpickler(io.BytesIO(value.detach().cpu().numpy().tobytes())).load()
    except Exception as e:  # noqa: BLE001 (any decoding failure is a refusal)
        raise CheckpointError(
            f"{key}: refusing to load this Transformer Engine FP8 state ({_one_line(e)}); if you "
            f"trust the checkpoint, set {UNSAFE_EXTRA_STATE_ENV}=1"
        ) from None


def _fp8_delayed(chunks) -> bool:
    cfg = getattr(unwrap(chunks[0]), "config", None)
    return bool(getattr(cfg, "fp8", None)) and str(getattr(cfg, "fp8_recipe", "")).endswith(
        "delayed"
    )


def prepare_extra_state(model_state: dict, keep: bool) -> None:
    """In place on a loaded model state dict: see the block comment above."""
    for k, v in model_state.items():
        if not k.endswith("_extra_state"):
            continue
        if not keep:
            model_state[k] = torch.empty(0, dtype=torch.uint8)
        elif os.environ.get(UNSAFE_EXTRA_STATE_ENV) != "1":
            check_extra_state_payload(k, v)


@contextlib.contextmanager
def _extra_state_opt_in(enabled: bool):
    """TE's unpickling opt-in for the duration of one verified load (restored after)."""
    if not enabled:
        yield
        return
    before = os.environ.get(UNSAFE_EXTRA_STATE_ENV)
    os.environ[UNSAFE_EXTRA_STATE_ENV] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(UNSAFE_EXTRA_STATE_ENV, None)
        else:
            os.environ[UNSAFE_EXTRA_STATE_ENV] = before


def load_checkpoint(path: str, chunks, optimizer, scheduler, load_optimizer: bool = True) -> dict:
    """Restore the ``iter_N`` checkpoint ``path`` in place; returns its train_state (with
    ``iteration``). A weights-only checkpoint restores only the weights."""
    iteration = iteration_of(path)
    _check_complete(path)
    with reading(path):
        common = mcore.dist_checkpointing.load_common_state_dict(path)
    if common.get("train_state", {}).get("weights_only"):
        load_weights_only(path, chunks, optimizer)
        return dict(common["train_state"], iteration=iteration)
    rank, world = dist.get_rank(), dist.get_world_size()
    model_sd = _model_sharded_state_dict(chunks)
    sd = dict(model_sd)
    prefixes = ()
    if load_optimizer and optimizer is not None:
        _check_optimizer_kind(path, optimizer)
        sd["optimizer"] = optimizer.sharded_state_dict(
            model_sd, is_loading=True, metadata=OPTIM_META
        )
        prefixes = ("optimizer.",)
    same_layout = common.get("world_size") == world
    if same_layout:
        sd["rng_state"] = _rng_object(world, rank)
    state = _strict_load(path, sd, requested_prefixes=prefixes)
    keep_fp8 = _fp8_delayed(chunks)
    for name in model_sd:
        prepare_extra_state(state[name], keep=keep_fp8)
    with reading(path), _extra_state_opt_in(keep_fp8):
        if len(chunks) == 1:
            unwrap(chunks[0]).load_state_dict(state["model"])
        else:
            for i, c in enumerate(chunks):
                unwrap(c).load_state_dict(state[f"model{i}"])
        if load_optimizer and optimizer is not None:
            _align_param_groups(state["optimizer"], optimizer)
            optimizer.load_state_dict(state["optimizer"])
            _recast_fp8_weights(optimizer, chunks)
        else:
            _refresh_main_params(optimizer)
        if scheduler is not None:
            scheduler.load_state_dict(common["scheduler"])
        if same_layout:
            _set_rng_state(state["rng_state"])
    return dict(common["train_state"], iteration=iteration)


def check_save_target(save: str | None) -> None:
    """``--save`` must be (or become) a directory: found at setup, not after the first interval."""
    if not save:
        return
    if os.path.exists(save) and not os.path.isdir(save):
        raise CheckpointError(f"--save {save} exists and is not a directory")
    parent = os.path.dirname(os.path.abspath(save))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise CheckpointError(f"--save {save}: cannot create it under {parent}")


def load_for_training(run, chunks, optimizer, scheduler, log) -> dict | None:
    """``--load`` for the trainer: find the checkpoint, verify its files, compare architectures,
    then load strictly (``--finetune``: the weights only) and check the weights are finite.
    Returns the train_state to resume, or None when training starts at iteration 0. ``log``
    prints on one rank."""
    t = run.train
    try:
        path = resolve_load(t.load, None if t.finetune else t.save)
    except CheckpointError as e:
        if t.finetune:
            raise CheckpointError(f"--finetune: no checkpoint in --load {t.load}: {e}") from None
        raise
    if path is None:
        log(f"--load {t.load}: no checkpoint yet (first run with --load = --save): starting fresh")
        return None
    if os.path.normpath(path) == os.path.normpath(t.load):
        log(f"--load names the iteration directory {path}: loading exactly that iteration")
    if t.verify_checkpoint_checksums:
        verify_checksums(path)
    check_architecture(path, run.model)
    try:
        if t.finetune:
            load_weights_only(path, chunks, optimizer)
        else:
            st = load_checkpoint(path, chunks, optimizer, scheduler, not t.no_load_optim)
        check_finite(path, chunks)
    except DamagedCheckpoint as e:
        if t.verify_checkpoint_checksums or not os.path.isfile(os.path.join(path, MANIFEST)):
            raise
        raise CheckpointError(
            f"{e} [checksums were skipped: run without --no-verify-checkpoint-checksums to find "
            "a damaged file]"
        ) from None
    if t.finetune:
        log(
            f"loaded the weights of {path} (--finetune: iteration, optimizer, LR "
            "schedule and data position start fresh)"
        )
        return None
    log(
        f"resumed from {path} at iteration {st['iteration']} "
        f"(consumed samples {st['consumed_samples']})"
    )
    return st
