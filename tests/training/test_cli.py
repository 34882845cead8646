"""Run config from presets, YAML, Megatron flags and overrides; --dry-run."""

from __future__ import annotations

import pytest

from megatron_hybrid.models.olmo_hybrid.config import ConfigError
from megatron_hybrid.train import main
from megatron_hybrid.training.cli import parse


def test_megatron_flags_map_onto_fields():
    run, _ = parse(
        [
            "--preset",
            "tiny",
            "--tensor-model-parallel-size",
            "2",
            "--pipeline-model-parallel-size",
            "2",
            "--virtual-pipeline-model-parallel-size",
            "2",
            "--context-parallel-size",
            "2",
            "--sequence-parallel",
            "--use-distributed-optimizer",
            "--micro-batch-size",
            "2",
            "--global-batch-size",
            "64",
            "--seq-length",
            "128",
            "--train-iters",
            "7",
            "--lr",
            "2e-4",
            "--min-lr",
            "2e-5",
            "--lr-warmup-iters",
            "3",
            "--lr-decay-style",
            "WSD",
            "--weight-decay",
            "0.05",
            "--clip-grad",
            "0.5",
            "--bf16",
            "--data-path",
            "0.3",
            "a",
            "0.7",
            "b",
            "--split",
            "98,2,0",
            "--save",
            "/tmp/x",
            "--save-interval",
            "5",
            "--ckpt-format",
            "torch_dist",
            "--log-interval",
            "3",
            "--eval-interval",
            "4",
            "--eval-iters",
            "2",
            "--hybrid-layer-pattern",
            "G-*-|G-G-",
            "--max-position-embeddings",
            "512",
        ]
    )
    p, t, o, d = run.parallel, run.train, run.optim, run.data
    assert (p.tensor, p.pipeline, p.virtual_pipeline, p.context) == (2, 2, 2, 2)
    assert p.sequence_parallel and p.distributed_optimizer
    assert (t.micro_batch_size, t.global_batch_size, t.train_iters, t.precision) == (
        2,
        64,
        7,
        "bf16",
    )
    assert (o.lr, o.min_lr, o.warmup_iters, o.decay_style, o.clip_grad) == (
        2e-4,
        2e-5,
        3,
        "WSD",
        0.5,
    )
    assert d.data_path == ["0.3", "a", "0.7", "b"] and d.split == "98,2,0" and d.seq_length == 128
    assert run.model.block_types == ("gdn", "attention", "gdn", "gdn")
    assert run.model.max_position_embeddings == 512


def test_precedence_yaml_then_flags_then_overrides(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        "preset: tiny\noptim:\n  lr: 0.01\n  min_lr: 0.001\ntrain:\n  train_iters: 9\n"
        "model:\n  intermediate_size: 128\n"
    )
    run, _ = parse(
        [
            "--config",
            str(cfg),
            "--lr",
            "0.02",
            "optim.min_lr=5e-4",
            "--train.log_interval=4",
            "model.gdn_allow_neg_eigval=false",
        ]
    )
    assert run.optim.lr == 0.02 and run.optim.min_lr == 5e-4 and run.train.train_iters == 9
    assert run.train.log_interval == 4 and run.model.intermediate_size == 128
    assert run.model.gdn_allow_neg_eigval is False


def test_unknown_field_is_named():
    with pytest.raises(ConfigError, match="unknown config field 'lrr'"):
        parse(["optim.lrr=1"])


def test_dry_run_7b_reports_params_and_builds_nothing(capsys):
    assert (
        main(
            [
                "--preset",
                "olmo_hybrid_7b",
                "--mock-data",
                "--dry-run",
                "--world-size",
                "8",
                "--tensor-model-parallel-size",
                "2",
                "--pipeline-model-parallel-size",
                "2",
                "--use-distributed-optimizer",
                "--seq-length",
                "8192",
                "--global-batch-size",
                "512",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "parameters: 7,430,870,688 total" in out
    assert "world 8 = TP 2 x PP 2 x CP 1 x DP 2" in out
    assert "micro-batches per step per DP rank 256" in out
    assert "gdn_core" in out and "attention_core" in out


@pytest.mark.parametrize(
    "args,needle",
    [
        (
            ["--world-size", "6", "--tensor-model-parallel-size", "4"],
            "world size 6 is not divisible by TP(4) x PP(1) x CP(1) = 4",
        ),
        (
            ["--world-size", "4", "--tensor-model-parallel-size", "4"],
            "num_attention_heads=6 is not divisible by tensor parallel size 4",
        ),
        (
            ["--global-batch-size", "6", "--micro-batch-size", "4"],
            "global_batch_size=6 is not divisible by micro_batch_size=4",
        ),
    ],
)
def test_impossible_layouts_rejected_before_building(capsys, args, needle):
    assert main(["--preset", "tiny", "--mock-data", "--dry-run", *args]) == 2
    assert needle in capsys.readouterr().err


def test_gdn_save_intermediates_reaches_the_mixer():
    from megatron_hybrid.models.olmo_hybrid.specs import gdn_shape

    run, _ = parse(["--preset", "tiny", "model.gdn_save_intermediates=true"])
    assert gdn_shape(run.model).save_intermediates is True
    run, _ = parse(["--preset", "tiny"])
    assert gdn_shape(run.model).save_intermediates is False
