"""--finetune: only the weights of a checkpoint; iteration, optimizer, schedule and data restart.

Reference: the weights-only checkpoint that tools/convert_to_hf.py + convert_from_hf.py make of
the same checkpoint (bitwise the same weights, nothing else), loaded normally. Both runs must
print the same losses from iteration 1.
"""

from __future__ import annotations

from tests.conftest import TINY_MOCK, parse_losses, run_python, train_cmd


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def test_finetune_equals_loading_the_weights_alone(tmp_path):
    full = str(tmp_path / "full")
    _ok(run_python(train_cmd(*TINY_MOCK, "--train-iters", "3", "--save", full)))
    hf, weights = str(tmp_path / "hf"), str(tmp_path / "weights")
    _ok(run_python(["tools/convert_to_hf.py", "--load", full, "--save", hf, "--skip-validation"]))
    _ok(run_python(["tools/convert_from_hf.py", "--hf-model", hf, "--save", weights]))

    run = [*TINY_MOCK, "--train-iters", "3"]
    ft = _ok(run_python(train_cmd(*run, "--load", full, "--finetune")))
    ref = _ok(run_python(train_cmd(*run, "--load", weights)))
    assert (
        "--finetune: iteration, optimizer, LR schedule and data position start fresh" in ft.stdout
    )
    got, want = parse_losses(ft.stdout), parse_losses(ref.stdout)
    assert sorted(got) == [1, 2, 3] and got == want, (got, want)
    fresh = parse_losses(_ok(run_python(train_cmd(*run))).stdout)
    assert fresh[1][0] > got[1][0]  # the trained weights were really loaded

    empty = run_python(train_cmd(*run, "--load", str(tmp_path / "none"), "--finetune"))
    assert empty.returncode != 0 and "--finetune: no checkpoint" in empty.stdout + empty.stderr
