"""Activation recompute (Megatron's --recompute-* flags, issue 16 item 4) on CPU, fp32.

- In one process (recompute_check.py, a tiny G-*-G-G- model built through the training setup
  code, local spec, torch GDN reference, one packed row of two documents): every setting gives
  the loss of the run without recompute and its gradients (bitwise; the layernorm recompute to
  fp32 summation order), the recomputed parts really run twice, and autograd keeps fewer bytes
  after the forward. Also gdn and full recompute through our Triton GDN kernels (interpreter).
- End to end through the trainer (flags -> config -> model): 2 iterations with recompute
  reproduce the losses and grad norms of the 1-rank run without: full/block under pipeline
  parallel + distributed optimizer, all selective modules under context parallel.
- Flag errors: Megatron's rules as one ``error:`` line naming the flag.
"""

from __future__ import annotations

import functools
import json

import pytest

from megatron_hybrid.train import main
from tests.conftest import TINY_MOCK, concurrently, parse_losses, run_python, train_cmd
from tests.parallel import train_runs

SELECTIVE = ["core_attn", "gdn", "mlp", "layernorm"]


def _check(*args: str, env=None) -> dict[str, dict]:
    proc = run_python(["-m", "tests.training.recompute_check", *args], timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return {r["name"]: r for r in rows}


@pytest.fixture(scope="module")
def rows():
    # two processes: Triton's interpreter mode is process-wide and would slow the torch cases;
    # at the same time (one core each)
    torch_rows, triton_rows = concurrently(
        _check, lambda: _check("--triton", env={"TRITON_INTERPRET": "1"})
    )
    return {**torch_rows, **triton_rows}


# which counters each setting must double (pattern G-*-G-G-: 8 sub-layers, 1 attention core,
# 3 GDN kernels, 4 MLPs, 8 block norms); the others must stay as without recompute
DOUBLED = {
    "full_uniform_1": {"layer", "core_attn", "gdn_kernel", "mlp", "norm"},
    "full_uniform_2": {"layer", "core_attn", "gdn_kernel", "mlp", "norm"},
    "selective_default": {"core_attn"},
    "selective_core_attn": {"core_attn"},
    "selective_gdn": {"gdn_kernel"},
    "selective_mlp": {"mlp"},
    "selective_layernorm": {"norm"},
    "selective_all": {"core_attn", "gdn_kernel", "mlp", "norm"},
}


@pytest.mark.parametrize("name", [*DOUBLED, "full_block_1"])
def test_same_loss_and_gradients_as_without_recompute(rows, name):
    r = rows[name]
    assert r["loss"] == r["ref_loss"]
    if "layernorm" in name or name == "selective_all":
        # the norm's input gradient is summed in another order (residual + norm paths)
        assert r["max_grad_diff"] <= 1e-6 * r["grad_scale"], r
    else:
        assert r["max_grad_diff"] == 0.0, r


@pytest.mark.parametrize("name", ["triton_selective_gdn", "triton_full_uniform_1"])
def test_triton_gdn_kernels_under_recompute(rows, name):
    """Our Triton GDN kernels (CPU interpreter; one G- block): same loss, bitwise gradients,
    the kernel run twice, fewer bytes kept."""
    r, base = rows[name], {"layer": 2, "core_attn": 0, "gdn_kernel": 1, "mlp": 1, "norm": 2}
    assert r["loss"] == r["ref_loss"] and r["max_grad_diff"] == 0.0, r
    if name == "triton_selective_gdn":
        assert r["calls"] == {**base, "gdn_kernel": 2}, r
    else:
        assert r["calls"] == {k: 2 * v for k, v in base.items()}, r


@pytest.mark.parametrize("name", [*DOUBLED, "full_block_1"])
def test_recompute_happens_and_saves_memory(rows, name):
    base, r = rows["none"]["calls"], rows[name]["calls"]
    assert base == {"layer": 8, "core_attn": 1, "gdn_kernel": 3, "mlp": 4, "norm": 8}
    if name == "full_block_1":
        # only the first block (G, -) of the stage is recomputed
        assert r == {"layer": 10, "core_attn": 1, "gdn_kernel": 4, "mlp": 5, "norm": 10}
    else:
        for key, n in base.items():
            assert r[key] == (2 * n if key in DOUBLED[name] else n), (key, r)
    assert rows[name]["saved_bytes"] < rows["none"]["saved_bytes"], rows[name]


def test_memory_ordering(rows):
    """Full recompute keeps far less than selective, all selective modules less than any one."""
    saved = {k: v["saved_bytes"] for k, v in rows.items()}
    assert saved["full_uniform_1"] < saved["selective_all"] < saved["none"] / 3
    assert saved["full_uniform_2"] <= saved["full_uniform_1"]
    for m in SELECTIVE:
        assert saved["selective_all"] < saved[f"selective_{m}"]


# ---- end to end through the trainer --------------------------------------------------------

E2E = [*TINY_MOCK, "--train-iters", "2", "--global-batch-size", "2"]


@pytest.fixture(scope="module")
def reference():
    proc = run_python(train_cmd(*E2E))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "activation recompute: off" in proc.stdout
    losses = parse_losses(proc.stdout)
    assert sorted(losses) == [1, 2]
    return losses


RECOMPUTE_LAYOUTS = {
    "pp2_distopt_full_block": (
        ["--pipeline-model-parallel-size", "2", "--use-distributed-optimizer"],
        ["--recompute-granularity", "full", "--recompute-method", "block",
         "--recompute-num-layers", "1"],
    ),
    "cp2_selective_all": (
        ["--context-parallel-size", "2"],
        ["--recompute-granularity", "selective", "--recompute-modules", *SELECTIVE],
    ),
}  # fmt: skip


@pytest.fixture(scope="module")
def recompute_layout_runs():
    """The 2-rank runs of RECOMPUTE_LAYOUTS in one launch (tests/parallel/train_runs.py): name
    -> that run's output (the function asserts the launch succeeded)."""
    runs = [[*E2E, *layout, *flags] for layout, flags in RECOMPUTE_LAYOUTS.values()]
    _, output = train_runs.launch(runs, nproc=2, timeout=600)
    return {name: functools.partial(output, i) for i, name in enumerate(RECOMPUTE_LAYOUTS)}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RECOMPUTE_LAYOUTS))
def test_trainer_parallel_layouts_with_recompute(reference, recompute_layout_runs, name):
    flags = RECOMPUTE_LAYOUTS[name][1]
    stdout = recompute_layout_runs[name]()
    assert "activation recompute: " + ("full, block" if "full" in flags else "selective") in (
        stdout
    )
    got = parse_losses(stdout)
    assert sorted(got) == [1, 2]
    for it, (loss, gnorm) in reference.items():
        assert got[it][0] == pytest.approx(loss, rel=2e-4), (it, got[it], loss)
        assert got[it][1] == pytest.approx(gnorm, rel=2e-3), (it, got[it], gnorm)


# ---- flag errors -----------------------------------------------------------------------------

DRY = ["--preset", "tiny", "--mock-data", "--dry-run"]


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--recompute-granularity", "everything"],
            "--recompute-granularity (recompute.granularity)='everything': use full or selective",
        ),
        (
            ["--recompute-method", "uniform"],
            "--recompute-method (recompute.method)='uniform' applies to "
            "--recompute-granularity full only",
        ),
        (
            ["--recompute-granularity", "selective", "--recompute-method", "block"],
            "applies to --recompute-granularity full only (got 'selective')",
        ),
        (
            ["--recompute-granularity", "full", "--recompute-method", "diagonal"],
            "--recompute-method (recompute.method)='diagonal': use uniform or block",
        ),
        (
            ["--recompute-granularity", "full", "--recompute-num-layers", "1"],
            "--recompute-granularity full needs --recompute-method (recompute.method): "
            "uniform or block",
        ),
        (
            ["--recompute-granularity", "full", "--recompute-method", "uniform"],
            "needs --recompute-num-layers (recompute.num_layers) between 1 and the blocks of "
            "one pipeline stage (8); got None",
        ),
        (
            ["--recompute-granularity", "full", "--recompute-method", "block"]
            + ["--recompute-num-layers", "9"],
            "between 1 and the blocks of one pipeline stage (8); got 9",
        ),
        (
            ["--recompute-granularity", "full", "--recompute-method", "block"]
            + ["--recompute-num-layers", "5", "--pipeline-model-parallel-size", "2"]
            + ["--world-size", "2"],
            "between 1 and the blocks of one pipeline stage (4); got 5",
        ),
        (
            ["--recompute-granularity", "full", "--recompute-method", "block"]
            + ["--recompute-num-layers", "0"],
            "--recompute-num-layers (recompute.num_layers)=0: must be >= 1",
        ),
        (
            ["--recompute-granularity", "selective", "--recompute-num-layers", "2"],
            "--recompute-num-layers (recompute.num_layers)=2 applies to "
            "--recompute-granularity full only",
        ),
        (
            ["--recompute-granularity", "selective", "--recompute-modules", "core_attn", "ffn"],
            "unknown module(s) ['ffn']; choose from core_attn, gdn, mlp, layernorm",
        ),
        (
            ["--recompute-granularity", "selective", "recompute.modules="],
            "name at least one; choose from core_attn, gdn, mlp, layernorm",
        ),
        (
            ["--recompute-granularity", "full", "--recompute-method", "uniform"]
            + ["--recompute-num-layers", "1", "--recompute-modules", "mlp"],
            "applies to --recompute-granularity selective only (got 'full')",
        ),
        (
            ["--recompute-modules", "mlp"],
            "--recompute-modules (recompute.modules)=['mlp'] applies to "
            "--recompute-granularity selective only (got None)",
        ),
    ],
)
def test_bad_recompute_flags(capsys, flags, message):
    rc = main([*DRY, *flags])
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "flags, line",
    [
        ([], "activation recompute: off"),
        (
            ["--recompute-granularity", "full", "--recompute-method", "uniform"]
            + ["--recompute-num-layers", "2"],
            "activation recompute: full, uniform: every group of 2 block(s)",
        ),
        (["--recompute-granularity", "selective"], "activation recompute: selective: core_attn"),
    ],
)
def test_dry_run_prints_the_recompute_setup(capsys, flags, line):
    assert main([*DRY, *flags]) == 0
    assert line in capsys.readouterr().out


def test_recompute_maps_onto_megatron_config():
    from megatron_hybrid.training.cli import parse
    from megatron_hybrid.training.model_setup import transformer_config

    run, _ = parse(
        ["--preset", "tiny", "--recompute-granularity", "full", "--recompute-method", "block"]
        + ["--recompute-num-layers", "3"]
    )
    tcfg = transformer_config(run)
    # the stack's layers are sub-layers: 3 blocks = 6 of them
    assert (tcfg.recompute_granularity, tcfg.recompute_method) == ("full", "block")
    assert tcfg.recompute_num_layers == 6
    assert run.recompute.selective_modules() == frozenset()
    run, _ = parse(["--preset", "tiny", "--recompute-granularity", "selective"])
    assert transformer_config(run).recompute_granularity is None  # our layers do selective
    assert run.recompute.selective_modules() == {"core_attn"}
