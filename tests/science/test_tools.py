"""tools/expressivity.py and tools/scaling_ladder.py end to end at toy sizes on CPU (as users
run them: subprocesses), plus the accuracy evaluation against oracle and constant models."""

from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np
import pytest
import torch

from megatron_hybrid.data.synthetic_tasks import MQAR, Parity
from megatron_hybrid.training.task_accuracy import accuracy_by_length
from tests.conftest import ROOT, run_python


def _onehot(labels_bs, vocab):
    return torch.nn.functional.one_hot(labels_bs, vocab).float()


def test_accuracy_pipeline_on_oracle_and_constant_models():
    """An oracle that computes the running xor from the (padded, batched) tokens scores 1; a
    model that always says 0 scores the share of zeros; MQAR's oracle reads its own context."""
    task = Parity()

    def oracle(tokens_bs):
        return _onehot(torch.cumsum(tokens_bs, 1) % 2, 4)

    def zeros(tokens_bs):
        return _onehot(torch.zeros_like(tokens_bs), 4)

    got = accuracy_by_length(oracle, task, [5, 9], n_examples=20, batch_size=8, seed=0)
    assert sorted(got) == [5, 9]
    assert got[9]["accuracy"] == 1.0 and got[9]["seq_accuracy"] == 1.0
    assert got[9]["answers"] == 20 * 9
    const = accuracy_by_length(zeros, task, [9], n_examples=50, batch_size=16, seed=0)[9]
    assert 0.3 < const["accuracy"] < 0.7 and const["seq_accuracy"] < 0.1

    mqar = MQAR(num_keys=16, num_values=8)

    def mqar_oracle(tokens_bs):
        out = torch.zeros(*tokens_bs.shape, mqar.vocab_size)
        for i, row in enumerate(tokens_bs.tolist()):
            n = len(row) // 3
            table = {row[2 * j]: row[2 * j + 1] for j in range(n)}
            for t in range(2 * n, 3 * n):
                out[i, t, table[row[t]]] = 1
        return out

    m = accuracy_by_length(mqar_oracle, mqar, [4], n_examples=10, batch_size=4, seed=1)[4]
    assert m["accuracy"] == 1.0 and m["answers"] == 40


def test_toy_expressivity_grid(tmp_path):
    out = tmp_path / "expr"
    args = ["tools/expressivity.py", "--out", str(out), "--toy", "--tasks", "parity",
            "--archs", "transformer", "hybrid_beta02", "--seeds", "1", "--train-iters", "3",
            "--eval-examples", "8"]  # fmt: skip
    proc = run_python(args, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for ext in ("md", "json", "png"):
        assert (out / f"expressivity.{ext}").stat().st_size > 0
    doc = json.loads((out / "expressivity.json").read_text())
    assert doc["pending"] == 0 and len(doc["cells"]) == 2
    assert set(doc["summary"]["parity"]) == {"transformer", "hybrid_beta02"}
    p = doc["params"]
    assert abs(p["transformer"] - p["hybrid_beta02"]) / p["transformer"] < 0.01  # equal size
    for cell in doc["cells"]:
        assert "--hybrid-layer-pattern" in cell["argv"] and cell["device"] == "cpu"
        assert "--fp32" in cell["argv"]  # the grid's precision is explicit, GPU or not
        for length in ("6", "12"):  # the toy parity test lengths
            m = cell["metrics"][length]
            assert m["answers"] == 8 * int(length) and 0.0 <= m["accuracy"] <= 1.0
        s = doc["summary"]["parity"][cell["arch"]]["12"]["accuracy"]
        assert s["n"] == 1 and s["mean"] == cell["metrics"]["12"]["accuracy"]
    md = (out / "expressivity.md").read_text()
    assert "## parity: accuracy" in md and "| transformer |" in md
    # a second run finds every cell done and trains nothing
    before = (out / "cells" / "parity__transformer__s1.json").stat().st_mtime
    again = run_python(args, timeout=300)
    assert again.returncode == 0 and "2 cells done, 0 to run" in again.stdout
    assert (out / "cells" / "parity__transformer__s1.json").stat().st_mtime == before


def test_toy_ladder_resumes_and_fits(tmp_path):
    out = tmp_path / "ladder"
    base = ["tools/scaling_ladder.py", "--out", str(out), "--toy", "--bootstrap", "50"]
    # 1) every rung stops (saved) at step 4: nothing finished, the report says so
    first = run_python([*base, "--exit-interval", "4"], timeout=300)
    assert first.returncode == 4, first.stderr[-3000:]
    rungs = out / "rungs"
    names = ["transformer_r1", "transformer_r2", "hybrid_r1", "hybrid_r2"]
    for name in names:
        assert (rungs / name / "latest_checkpointed_iteration.txt").read_text() == "4"
        assert not (rungs / f"{name}.json").exists()
    assert "Incomplete: 4 rungs pending" in (out / "scaling_ladder.md").read_text()
    bad = run_python([*base, "--only", "hybrid_r9"], timeout=300)
    assert bad.returncode == 2 and "no such rung ['hybrid_r9']" in bad.stderr
    # 2) the same command without the stop resumes the rungs from step 4 and finishes them,
    #    two at a time, each in its own process (--jobs): first the two of one sitting (--only,
    #    by name and by index), then the rest
    part = run_python([*base, "--jobs", "2", "--only", "transformer_r1,3"], timeout=300)
    assert part.returncode == 0, part.stdout[-3000:] + part.stderr[-3000:]
    assert part.stdout.count(": started (slot") == 2 and "Incomplete: 2 rungs" in part.stdout
    assert [n for n in names if (rungs / f"{n}.json").exists()] == ["transformer_r1", "hybrid_r2"]
    second = run_python([*base, "--jobs", "2"], timeout=300)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert second.stdout.count(": started (slot") == 2 and "FAILED" not in second.stdout
    doc = json.loads((out / "scaling_ladder.json").read_text())
    assert doc["pending"] == []
    for r in doc["rungs"]:
        log = (rungs / f"{r['name']}.log").read_text()
        assert "at iteration 4" in log and "resumed from" in log, r["name"]
        assert np.isfinite(r["val_loss"]) and r["val_loss"] < np.log(512) + 1
        assert r["flops"] == pytest.approx(r["flops_per_token"] * r["tokens"])
        assert (rungs / r["name"] / "latest_checkpointed_iteration.txt").read_text() == str(
            r["train_iters"]
        )
        kept = sorted(n for n in os.listdir(rungs / r["name"]) if n.startswith("iter_"))
        assert kept == [f"iter_{r['train_iters']:07d}"]  # --keep-last-checkpoints 1
    assert set(doc["fits"]) == {"transformer", "hybrid"}
    assert doc["compute_multiplier"]["multiplier"] > 0
    assert (out / "scaling_ladder.png").stat().st_size > 0
    patterns = {r["arch"]: r["pattern"] for r in doc["rungs"]}
    assert patterns == {"transformer": "*-*-*-*-", "hybrid": "G-G-G-*-"}
    # 3) finished rungs are skipped (nothing trains: the rung's log does not grow)
    size = os.path.getsize(rungs / "hybrid_r1.log")
    third = run_python([*base, "--rung", "hybrid_r1"], timeout=300)
    assert third.returncode == 0 and "hybrid_r1: done" in third.stdout
    assert os.path.getsize(rungs / "hybrid_r1.log") == size


def test_grid_precision_reaches_the_trainer():
    """Every cell runs at the grid's precision: fp32 unless asked (GridConfig.precision)."""
    from megatron_hybrid.science import expressivity as ex
    from megatron_hybrid.training.cli import parse

    for precision in ("fp32", "bf16"):
        grid = ex.GridConfig(tasks={"parity": ex.TOY_TASKS["parity"]}, archs=["hybrid_beta02"],
                             seeds=[1], shape=ex.TOY_SHAPE, precision=precision)  # fmt: skip
        (cell,) = ex.plan(grid)
        run, _ = parse(cell["argv"])
        assert run.train.precision == precision


def test_addressed_recall_grid_task_reaches_the_trainer():
    """state_recall_addr: the spec's generator with an addressed memory and five queries, at a
    sequence length that holds its longest training example (2 swaps)."""
    from megatron_hybrid.science import expressivity as ex
    from megatron_hybrid.training.cli import parse

    spec = ex.REAL_TASKS["state_recall_addr"]
    grid = ex.GridConfig(tasks={"state_recall_addr": spec}, archs=["transformer"], seeds=[1])
    (cell,) = ex.plan(grid)
    run, _ = parse(cell["argv"])
    syn = run.synthetic
    assert (syn.task, syn.state_recall_addressed, syn.state_recall_queries) == (
        "state_recall",
        True,
        5,
    )
    assert run.data.seq_length == syn.build().seq_len(2) == 32 + 12 + 4 + 6
    assert cell["name"] == "state_recall_addr__transformer__s1"


def test_cell_stopped_by_the_time_limit_resumes_to_the_same_result(tmp_path):
    """A cell stopped at the grid's time limit saves and, run again, resumes from its
    checkpoint and ends with exactly the result of an uninterrupted run (CPU training is
    deterministic), so a grid can be spread over several short GPU calls."""
    from megatron_hybrid.science import expressivity as ex

    grid = ex.GridConfig(tasks={"parity": ex.TOY_TASKS["parity"]}, archs=["hybrid_beta02"],
                         seeds=[1], shape=ex.TOY_SHAPE, train_iters=4, eval_examples=8)  # fmt: skip
    (cell,) = ex.plan(grid)
    whole = ex.run_cell(cell, str(tmp_path / "whole.log"))
    ckpt = str(tmp_path / "cell.ckpt")
    log = str(tmp_path / "cell.log")
    # a deadline already past: the trainer stops (saving) at its first step boundary
    assert ex.run_cell(cell, log, ckpt_dir=ckpt, deadline=time.time()) is None
    assert (tmp_path / "cell.ckpt" / "latest_checkpointed_iteration.txt").read_text() == "1"
    resumed = ex.run_cell(cell, log, ckpt_dir=ckpt)
    assert resumed is not None and not os.path.exists(ckpt)  # a finished cell keeps its result only
    assert "resumed from" in open(log).read()
    assert resumed["argv"] == cell["argv"]  # --save/--load stay out of the cell's identity
    assert resumed["metrics"] == whole["metrics"]
    assert resumed["final_train_loss"] == whole["final_train_loss"]


def test_grid_time_limit_saves_running_cells_and_the_rerun_resumes_them(tmp_path):
    """tools/expressivity.py in worker mode (as on the GPU): the time limit lands while the cell
    runs; the worker saves and stops, the tool exits 4 (work left); the same command resumes it."""
    out = tmp_path / "expr"
    args = ["tools/expressivity.py", "--out", str(out), "--toy", "--tasks", "parity",
            "--archs", "gdn_beta02", "--seeds", "1", "--train-iters", "4",
            "--eval-examples", "8", "--jobs", "1"]  # fmt: skip
    first = run_python([*args, "--time-limit", "2"], timeout=300)  # setup alone takes longer
    assert first.returncode == 4, first.stdout[-2000:] + first.stderr[-2000:]
    assert "1 cells stopped, saved: parity__gdn_beta02__s1" in first.stdout
    ckpt = out / "cells" / "parity__gdn_beta02__s1.ckpt"
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "1"
    second = run_python(args, timeout=300)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    assert "resumed from" in (out / "cells" / "parity__gdn_beta02__s1.log").read_text()
    assert not ckpt.exists()
    assert json.loads((out / "expressivity.json").read_text())["pending"] == 0


def test_ladder_corpus_rebuilt_elsewhere_must_be_the_same(tmp_path):
    """A ladder spread over GPU sittings rebuilds the demo corpus on each fresh machine from the
    carried corpus.json + tokenizer: the tokenizer is reused and the rebuilt corpus must match
    the recorded fingerprint; finished rungs of another corpus are refused, not mixed in."""
    from megatron_hybrid.science import ladder as L

    out = str(tmp_path / "ladder")
    first = L.prepare_demo_corpus(out, 0.2, 512, site_packages=False, log=lambda *_: None)
    assert len(first["fingerprint"]) == 16
    cdir = tmp_path / "ladder" / "corpus"

    def fresh_machine():  # what a new sitting has: the carried files only
        for f in cdir.iterdir():
            if f.name not in ("corpus.json", "tokenizer.model", "tokenizer.vocab"):
                shutil.rmtree(f) if f.is_dir() else f.unlink()

    fresh_machine()
    lines = []
    again = L.prepare_demo_corpus(out, 0.2, 512, site_packages=False, log=lines.append)
    assert any("kept, not retrained" in x for x in lines)
    assert again["fingerprint"] == first["fingerprint"] and again["tokens"] == first["tokens"]

    fresh_machine()
    doc = json.loads((cdir / "corpus.json").read_text())
    (cdir / "corpus.json").write_text(json.dumps({**doc, "fingerprint": "0123456789abcdef"}))
    with pytest.raises(RuntimeError, match="differs from the one recorded"):
        L.prepare_demo_corpus(out, 0.2, 512, site_packages=False, log=lambda *_: None)

    rungs = tmp_path / "ladder" / "rungs"
    rungs.mkdir()
    (rungs / "hybrid_r1.json").write_text(json.dumps({"corpus": "0123456789abcdef"}))
    plans = [{"name": "hybrid_r1", "corpus": first["fingerprint"]}]
    with pytest.raises(RuntimeError, match="another corpus"):
        L.check_finished_rungs(plans, out)
    L.check_finished_rungs([{"name": "hybrid_r1", "corpus": "0123456789abcdef"}], out)


def test_ladder_micro_batch_follows_the_memory_a_rung_may_use():
    """Larger micro-batches where the memory estimate allows (an H100 ran the 50 M rungs ~1.8x
    faster at 64 than at 16); bigger rungs or a smaller share of the card get smaller ones."""
    from megatron_hybrid.science import ladder as L

    tok = os.path.join(ROOT, "docs/science/ladder_h100/corpus/tokenizer.model")
    data = {"prefix": "x", "tokenizer_type": "SentencePieceTokenizer", "tokenizer_model": tok}
    sizes = [(256, 4), (640, 8), (1024, 12)]

    def chosen(**kw):
        cfg = L.LadderConfig(sizes=sizes, **kw)
        return [L.micro_batch_for(cfg, r, data) for r in cfg.rungs()]

    assert chosen() == [16] * 6  # no GPU, no budget: the old default
    assert chosen(micro_batch_size=8, rung_memory_gib=80.0) == [8] * 6  # asked for: kept
    quarter, half, whole = (
        chosen(rung_memory_gib=20.0),
        chosen(rung_memory_gib=40.0),
        chosen(rung_memory_gib=80.0),
    )
    assert whole == [64] * 6
    for small, big in ((quarter, half), (half, whole)):
        assert all(s <= b for s, b in zip(small, big))
    # within one architecture a wider rung never gets a larger micro-batch
    assert quarter[0] >= quarter[1] >= quarter[2] and quarter[2] < 64
    cfg = L.LadderConfig(sizes=sizes, rung_memory_gib=20.0)
    plan = L.rung_plan(cfg, cfg.rungs()[2], data, "/tmp/unused")
    mbs = plan["argv"][plan["argv"].index("--micro-batch-size") + 1]
    assert plan["micro_batch"] == int(mbs) == quarter[2]
