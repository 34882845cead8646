"""Issue 20 ("Nothing silent"), config side: every bad number or layout ends in one
``error: ...`` line naming the field and value (exit 2, no traceback), and --dry-run refuses
exactly what the real run refuses (data aside)."""

from __future__ import annotations

import pytest

from megatron_hybrid.train import main
from tests.conftest import TINY_MOCK, run_python, train_cmd

DRY = ["--preset", "tiny", "--mock-data", "--dry-run"]


def _dry_run(capsys, *flags: str) -> tuple[int, str]:
    rc = main([*DRY, *flags])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lr=-1e-3"], "--lr (optim.lr)=-0.001: must be >= 0"),
        (["--lr", "nan"], "--lr (optim.lr)=nan: must be >= 0"),
        (["--min-lr=-1e-5"], "--min-lr (optim.min_lr)=-1e-05: must be >= 0"),
        (["--lr", "1e-4", "--min-lr", "1e-3"], "--min-lr (optim.min_lr)=0.001: must be <= --lr"),
        (
            ["--micro-batch-size", "0"],
            "--micro-batch-size (train.micro_batch_size)=0: must be >= 1",
        ),
        (["--global-batch-size", "0"], "--global-batch-size (train.global_batch_size)=0"),
        (["--global-batch-size", "-8"], "--global-batch-size (train.global_batch_size)=-8"),
        (["--seq-length", "0"], "--seq-length (data.seq_length)=0: must be >= 1"),
        (["--train-iters", "-5"], "--train-iters (train.train_iters)=-5: must be >= 1"),
        (["--train-iters", "0"], "--train-iters (train.train_iters)=0: must be >= 1"),
        (["--lr-warmup-iters", "-1"], "--lr-warmup-iters (optim.warmup_iters)=-1: must be >= 0"),
        (["--lr-warmup-iters", "100", "--train-iters", "100"], "must be < the decay length 100"),
        (["--lr-decay-iters", "0"], "--lr-decay-iters (optim.decay_iters)=0: must be >= 1"),
        (["--log-interval", "0"], "--log-interval (train.log_interval)=0: must be >= 1"),
        (["--eval-interval", "-10"], "--eval-interval (train.eval_interval)=-10: must be >= 1"),
        (["--eval-iters", "0"], "--eval-iters (train.eval_iters)=0: must be >= 1"),
        (["--save-interval", "0"], "--save-interval (train.save_interval)=0: must be >= 1"),
        (["--exit-interval", "0"], "--exit-interval (train.exit_interval)=0: must be >= 1"),
        (["--seed", "-1"], "--seed (train.seed)=-1: must be >= 0"),
        (["--adam-beta2", "1.0"], "--adam-beta2 (optim.adam_beta2)=1.0: must be in [0, 1)"),
        (["--adam-eps", "0"], "--adam-eps (optim.adam_eps)=0.0: must be > 0"),
        (["--clip-grad", "-1"], "--clip-grad (optim.clip_grad)=-1.0: must be >= 0"),
        (["--weight-decay", "-0.1"], "--weight-decay (optim.weight_decay)=-0.1: must be >= 0"),
        (["--tensor-model-parallel-size", "0"], "--tensor-model-parallel-size (parallel.tensor)=0"),
        (["--split", "abc"], "--split (data.split)='abc': must be up to three"),
        (["--split", "0,1,0"], "must be a positive train weight"),
        (["train.max_consecutive_nan=0"], "train.max_consecutive_nan=0: must be >= 1"),
        (["data.num_workers=-1"], "data.num_workers=-1: must be >= 0"),
        (["model.num_attention_heads=0"], "model.num_attention_heads=0: must be an integer >= 1"),
        (["model.hidden_size=0"], "model.hidden_size=0: must be an integer >= 1"),
        (["model.num_layers=0"], "model.num_layers=0: must be an integer >= 1"),
        (["model.init_std=-1"], "model.init_std=-1.0: must be > 0"),
        (["model.rope_theta=-5"], "model.rope_theta=-5.0: must be > 0"),
        (["--seq-length", "8192"], "--seq-length 8192 exceeds --max-position-embeddings 4096"),
        (["--exp-avg-dtype", "bf16"], "needs --use-precision-aware-optimizer"),
        (
            ["--use-precision-aware-optimizer", "--exp-avg-dtype", "int4"],
            "--exp-avg-dtype (optim.exp_avg_dtype)='int4': must be one of fp32, fp16, bf16, fp8",
        ),
        (
            ["--use-precision-aware-optimizer", "--main-params-dtype", "bf16"],
            "--main-params-dtype (optim.main_params_dtype)='bf16': must be one of fp32, fp16",
        ),
        (["--use-precision-aware-optimizer"], "needs --use-distributed-optimizer"),
    ],
)
def test_bad_numbers_name_field_and_value(capsys, flags, message):
    rc, err = _dry_run(capsys, *flags)
    assert rc == 2 and message in err, err
    assert [ln for ln in err.splitlines() if ln.startswith("error: ")] == [
        ln for ln in err.splitlines() if "error" in ln.lower()
    ], err  # one error line, nothing else that reads as an error


def test_zero_lr_is_allowed_with_a_warning(capsys):
    """--lr 0 is a legitimate check run (tests/models/test_conversion.py uses one step at LR 0
    to prove the loaded weights survive it), so it is a warning, not an error."""
    rc = main([*DRY, "--lr", "0", "--min-lr", "0"])
    err = capsys.readouterr().err
    assert rc == 0 and "warning: --lr 0: the optimizer will not change the weights" in err


def test_bad_number_in_the_real_run_is_one_line(tmp_path):
    """The same check guards the real run (Trainer.setup), before any process group."""
    proc = run_python(train_cmd(*TINY_MOCK, "--train-iters", "2", "--micro-batch-size", "0"))
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "error: --micro-batch-size (train.micro_batch_size)=0: must be >= 1" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "flags, message",
    [
        # the real run refuses these in Trainer.setup / the model build; --dry-run used to pass
        (["--pipeline-model-parallel-size", "3", "--world-size", "3"],
         "8 blocks cannot be split evenly into 3 pipeline segments"),
        (["--fp8-format", "e4m3", "--spec", "local"], "FP8 needs --spec te and Transformer Engine"),
        (["--fp8-recipe", "delayed"], "--fp8-recipe needs --fp8-format"),
        (["--hybrid-layer-pattern", "G-G-|G-*-", "--pipeline-model-parallel-size", "3",
          "--world-size", "3"], "hybrid layer pattern has 2 pipeline segments"),
        (["--spec", "fancy"], "--spec 'fancy': use auto, te or local"),
        (["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", "/nonexistent.model"],
         "sentencepiece model not found: /nonexistent.model"),
        (["--world-size", "3", "--tensor-model-parallel-size", "2"],
         "world size 3 is not divisible by TP(2)"),
    ],
)  # fmt: skip
def test_dry_run_refuses_what_the_real_run_refuses(capsys, flags, message):
    rc, err = _dry_run(capsys, *flags)
    assert rc == 2 and message in err, err


def test_dry_run_without_data_still_plans(capsys):
    """Data aside: --dry-run needs no --data-path (it plans jobs for other machines)."""
    assert main(["--preset", "tiny", "--dry-run"]) == 0
    assert "parallel layout: world 1" in capsys.readouterr().out


@pytest.mark.parametrize(
    "rampup, extra, message",
    [
        (["2", "2", "100"], ["--micro-batch-size", "4"],
         "batch sizes [2, 6] on the ramp are not divisible by micro_batch_size 4 x "
         "data-parallel size 1 = 4"),
        (["16", "8", "100"], [], "--global-batch-size 8 minus START 16 must be a non-negative "
         "multiple of INCREMENT 8"),
        (["1", "3", "100"], [], "minus START 1 must be a non-negative multiple of INCREMENT 3"),
        (["0", "1", "100"], [], "START and INCREMENT must be >= 1 and SAMPLES >= 0"),
        (["2", "2", "-1"], [], "START and INCREMENT must be >= 1 and SAMPLES >= 0"),
    ],
)  # fmt: skip
def test_bad_rampup_is_refused_up_front(capsys, rampup, extra, message):
    rc, err = _dry_run(capsys, "--global-batch-size", "8", "--rampup-batch-size", *rampup, *extra)
    assert rc == 2 and "--rampup-batch-size (train.rampup_batch_size)=" in err, err
    assert message in err, err


def test_rampup_flag_and_override_spellings():
    from megatron_hybrid.training.cli import parse

    run, _ = parse(["--rampup-batch-size", "2", "2", "100"])
    assert run.train.rampup_batch_size == [2, 2, 100]
    run, _ = parse(["train.rampup_batch_size=4,4,64"])
    assert run.train.rampup_batch_size == [4, 4, 64]
