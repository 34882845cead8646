"""Issue 20, checkpoints: every bad --load / --save is one `error: ...` line (exit 2, no
traceback) naming the directory or file, or exactly the right behaviour (requeue, iter_N dirs,
old checkpoints without checksums).

One small checkpoint is saved per module and copied per case (tiny preset, mock data, 1 rank).
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from tests.conftest import TINY_MOCK, concurrently, run_python, train_cmd

ITER = "iter_0000002"
NO_VERIFY = "--no-verify-checkpoint-checksums"


def _fails(proc, *words: str) -> str:
    """Exit 2, one `error:` line holding ``words``, no traceback; returns that line."""
    err = proc.stderr
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-1500:], err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, err[-3000:]
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-1500:] + proc.stderr[-3000:]
    return proc


def _train(*extra: str, iters: int = 3):
    return run_python(train_cmd(*TINY_MOCK, "--train-iters", str(iters), *extra))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("saved") / "ckpt"
    _ok(_train("--save", str(root), iters=2))
    assert os.path.isfile(root / ITER / "checksums.sha256")
    return root


@pytest.fixture
def ckpt(saved, tmp_path):
    """A private copy of the saved checkpoint root."""
    return shutil.copytree(saved, tmp_path / "ckpt")


def _shard(root) -> str:
    return str(root / ITER / "__0_0.distcp")


def _scribble(path: str, at: float = 0.5, n: int = 4096) -> None:
    """Random bytes in the middle of a file (same size)."""
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(int(size * at))
        f.write(os.urandom(min(n, size // 4)))


def _edit_model(root, **changes) -> None:
    cfg_path = root / ITER / "run_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["model"].update(changes)
    cfg_path.write_text(json.dumps(cfg))


# ---- 1. what --load names ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["missing", "empty"])
def test_load_without_checkpoint_is_an_error(tmp_path, kind):
    load = tmp_path / "nothing"
    if kind == "empty":
        load.mkdir()
    proc = _train("--load", str(load), "--save", str(tmp_path / "out"))
    line = _fails(proc, str(load))
    assert ("no such directory" if kind == "missing" else "holds no checkpoint") in line
    assert "iteration        1/" not in proc.stdout  # never trained from random weights


def test_requeue_first_run_starts_fresh(tmp_path):
    root = str(tmp_path / "run")
    proc = _ok(_train("--load", root, "--save", root, iters=2))
    said = [ln for ln in proc.stdout.splitlines() if "no checkpoint yet" in ln]
    assert len(said) == 1 and "starting fresh" in said[0], proc.stdout[-2000:]
    assert os.path.isfile(os.path.join(root, "iter_0000002", "checksums.sha256"))


def test_load_iteration_directory_loads_exactly_it(ckpt):
    proc = _ok(_train("--load", str(ckpt / ITER)))
    assert "loading exactly that iteration" in proc.stdout
    assert f"resumed from {ckpt / ITER} at iteration 2" in proc.stdout
    assert "iteration        3/" in proc.stdout


# ---- 2. strict loading ----------------------------------------------------------------------


def test_other_architecture_is_named_before_any_tensor(ckpt):
    proc = _train("--load", str(ckpt), "--hybrid-layer-pattern", "G-G-*-", "model.hidden_size=192")
    _fails(proc, str(ckpt / ITER), "num_layers 8 -> 3", "hidden_size 96 -> 192", "block_types")


def test_tensors_without_a_place_are_named(ckpt):
    # run_config.json made to agree with a 4-block model: only the tensor check is left
    _edit_model(ckpt, num_layers=4, block_types=["gdn", "gdn", "gdn", "attention"])
    proc = _train("--load", str(ckpt), "--hybrid-layer-pattern", "G-G-G-*-", NO_VERIFY)
    _fails(proc, str(ckpt / ITER), "have no place in this model", "decoder.layers.8.")


def test_tensor_shape_mismatch_is_named(ckpt):
    _edit_model(ckpt, intermediate_size=128)
    proc = _train("--load", str(ckpt), "model.intermediate_size=128", NO_VERIFY)
    _fails(
        proc,
        str(ckpt / ITER),
        "another shape",
        "decoder.layers.1.mlp.linear_fc2.weight [96, 256] -> [96, 128]",
    )


# ---- 3. files torch cannot read (checksums skipped) ------------------------------------------


def test_truncated_shard_is_an_error(ckpt):
    shard = _shard(ckpt)
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)
    _fails(_train("--load", str(ckpt), NO_VERIFY), str(ckpt / ITER), "cannot load checkpoint")


def test_missing_metadata_is_an_error(ckpt):
    os.remove(ckpt / ITER / ".metadata")
    line = _fails(_train("--load", str(ckpt), NO_VERIFY), str(ckpt / ITER / ".metadata"))
    assert "is missing" in line and "checksums were skipped" in line


# ---- 4. checksums ---------------------------------------------------------------------------


def test_corrupt_shard_fails_the_checksum_on_resume(ckpt):
    _scribble(_shard(ckpt))
    _fails(_train("--load", str(ckpt)), "checksum mismatch", _shard(ckpt))


@pytest.mark.parametrize(
    "tool",
    [
        ["tools/generate.py", "--prompt-ids", "1,2,3", "--max-new-tokens", "2"],
        ["tools/generate.py", "--eval-file", "EVAL"],
        ["tools/convert_to_hf.py", "--save", "HF", "--skip-validation"],
    ],
    ids=["generate", "eval", "convert_to_hf"],
)
def test_corrupt_shard_fails_the_checksum_in_tools(ckpt, tmp_path, tool):
    _scribble(_shard(ckpt), at=0.8)
    (tmp_path / "eval.jsonl").write_text('{"text": "x"}\n')
    tool = [
        str(tmp_path / "eval.jsonl") if a == "EVAL" else str(tmp_path / "hf") if a == "HF" else a
        for a in tool
    ]
    proc = run_python([tool[0], "--load", str(ckpt), *tool[1:]])
    _fails(proc, "checksum mismatch", _shard(ckpt))


def test_tools_can_skip_the_checksums(ckpt):
    with open(ckpt / ITER / "run_config.json", "a") as f:
        f.write("\n")  # same content, another sha256
    args = [
        "tools/generate.py",
        "--load",
        str(ckpt),
        "--prompt-ids",
        "1,2",
        "--max-new-tokens",
        "2",
    ]
    refused, proc = concurrently(lambda: run_python(args), lambda: run_python([*args, NO_VERIFY]))
    _fails(refused, "checksum mismatch", str(ckpt / ITER / "run_config.json"))
    _ok(proc)
    assert "GENERATED ids=" in proc.stdout


def test_checkpoint_without_manifest_loads_with_a_warning(ckpt):
    os.remove(ckpt / ITER / "checksums.sha256")
    proc = _ok(_train("--load", str(ckpt)))
    warned = [ln for ln in proc.stderr.splitlines() if "checksums.sha256" in ln]
    assert len(warned) == 1 and "not verified" in warned[0], proc.stderr[-2000:]
    assert "resumed from" in proc.stdout


# ---- 5. --save ------------------------------------------------------------------------------


def test_save_onto_a_file_fails_before_training(tmp_path):
    target = tmp_path / "a_file"
    target.write_text("x")
    proc = _train("--save", str(target))
    _fails(proc, str(target), "not a directory")
    assert "iteration        1/" not in proc.stdout


# ---- 6. NaN weights -------------------------------------------------------------------------


def test_nan_weights_are_refused_at_load(tmp_path, monkeypatch):
    root = str(tmp_path / "nan")
    monkeypatch.setenv("MEGATRON_HYBRID_FAULT", "nan_in_save:2")  # NaN weights saved at 2
    _ok(_train("--save", root, iters=2))
    monkeypatch.delenv("MEGATRON_HYBRID_FAULT")
    _fails(_train("--load", root, NO_VERIFY), "NaN/inf in the loaded weights", "embedding")
