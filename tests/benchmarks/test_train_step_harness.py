"""benchmarks/train_step.py runs end to end (tiny model, CPU) and writes the JSON keys the
train-step issue names: a broken harness is found here, not on a GPU sitting. No timing is
asserted (benchmarks print tables; tests check they can)."""

from __future__ import annotations

import json

from tests.conftest import run_python


def test_harness_writes_table_and_json(tmp_path):
    out = tmp_path / "ts.json"
    proc = run_python(
        ["benchmarks/train_step.py", "--tiny", "--sides", "ours", "--seq", "64", "--steps", "2"]
        + ["--profile-ours", "--json", str(out)],
        env={"OUT": str(tmp_path)},
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "| ours |" in proc.stdout and "failed" not in proc.stdout, proc.stdout
    rec = json.loads(out.read_text())
    for key in (
        "ours_bf16_tokens_per_s_per_gpu",
        "ours_bf16_gbs8_tokens_per_s_per_gpu",
        "ours_fwdbwd_ms",
        "command",
        "versions",
    ):
        assert key in rec, (key, sorted(rec))
    r = rec["results"]["ours"]
    assert r["tokens_per_s_per_gpu"] > 0 and r["gbs8_step_ms"] > r["step_ms"] * 2
    assert (tmp_path / "train_step_logs.json").exists()
    # the profile charges time to modules in the forward *and* (by autograd sequence number) in
    # the backward: an attribution that lost the backward would leave the bwd rows empty
    by_module = r["profile"]["ms_per_step_by_module"]
    for module in ("GDN mixer", "attention mixer", "MLP", "LM head"):
        for direction in ("fwd", "bwd"):
            row = by_module.get(f"{direction} {module}", {})
            assert sum(row.values()) > 0, (direction, module, sorted(by_module))
    assert "| fwd GDN mixer |" in proc.stdout and "| bwd MLP |" in proc.stdout
