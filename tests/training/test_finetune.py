"""--finetune: only the weights of a checkpoint; iteration, optimizer, schedule and data restart.

Reference: the weights-only checkpoint that tools/convert_to_hf.py + convert_from_hf.py make of
the same checkpoint (bitwise the same weights, nothing else), loaded normally. Both runs must
print the same losses from iteration 1.
"""

from __future__ import annotations

from tests.conftest import TINY_MOCK, concurrently, parse_losses, run_python, train_cmd


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def test_finetune_equals_loading_the_weights_alone(tmp_path):
    # Seven 1-rank processes, run two at a time where they do not depend on each other (one
    # core each; the CI machine has two).
    full = str(tmp_path / "full")
    hf, weights = str(tmp_path / "hf"), str(tmp_path / "weights")
    run = [*TINY_MOCK, "--train-iters", "3"]

    def reference():  # the weights alone, through the HF conversion round trip
        _ok(
            run_python(
                ["tools/convert_to_hf.py", "--load", full, "--save", hf, "--skip-validation"]
            )
        )
        _ok(run_python(["tools/convert_from_hf.py", "--hf-model", hf, "--save", weights]))
        return _ok(run_python(train_cmd(*run, "--load", weights)))

    def untrained():  # no checkpoint at all, and --finetune of a missing one
        fresh = _ok(run_python(train_cmd(*run)))
        empty = run_python(train_cmd(*run, "--load", str(tmp_path / "none"), "--finetune"))
        return fresh, empty

    _, (fresh, empty) = concurrently(
        lambda: _ok(run_python(train_cmd(*TINY_MOCK, "--train-iters", "3", "--save", full))),
        untrained,
    )
    ft, ref = concurrently(
        lambda: _ok(run_python(train_cmd(*run, "--load", full, "--finetune"))), reference
    )
    assert (
        "--finetune: iteration, optimizer, LR schedule and data position start fresh" in ft.stdout
    )
    got, want = parse_losses(ft.stdout), parse_losses(ref.stdout)
    assert sorted(got) == [1, 2, 3] and got == want, (got, want)
    assert parse_losses(fresh.stdout)[1][0] > got[1][0]  # the trained weights were really loaded

    assert empty.returncode != 0 and "--finetune: no checkpoint" in empty.stdout + empty.stderr
