"""FP8 on the CPU side (issue 17): flag parsing, the run config's FP8 fields and checks, the
dry-run FP8 report, the FP8 GEMM/FLOPs plan, the environment check's messages, and the
checkpoint handling of Transformer Engine's ``_extra_state``. The GPU half is tests/gpu/test_fp8.py.
"""

from __future__ import annotations

import os
import pickle
import sys
import types
from dataclasses import dataclass

import pytest
import torch

from megatron_hybrid import mcore
from megatron_hybrid.models.olmo_hybrid.config import ConfigError
from megatron_hybrid.models.olmo_hybrid.presets import get_preset
from megatron_hybrid.train import main
from megatron_hybrid.training import checkpoint as ckpt
from megatron_hybrid.training import preflight
from megatron_hybrid.training.cli import parse
from megatron_hybrid.training.config import FP8_NEEDS_TE, fp8_bf16_blocks
from megatron_hybrid.training.flops import flops_per_token, gemm_precision_split
from megatron_hybrid.training.model_setup import fp8_fields, transformer_config

TINY = ["--preset", "tiny", "--mock-data"]


def _run(*flags: str):
    run, _ = parse([*TINY, *flags])
    return run


def _refused(*flags: str, world: int = 1) -> str:
    run = _run(*flags)
    with pytest.raises(ConfigError) as e:
        run.validate(world, require_data=False)
    return str(e.value)


# ---- flags ------------------------------------------------------------------------------------
def test_fp8_flags_map_onto_fields():
    run = _run(
        "--fp8-format", "hybrid",
        "--fp8-recipe", "tensorwise",
        "--fp8-margin", "2",
        "--fp8-amax-history-len", "16",
        "--fp8-amax-compute-algo", "max",
        "--first-last-layers-bf16",
        "--num-layers-at-start-in-bf16", "2",
        "--num-layers-at-end-in-bf16", "3",
        "--fp8-param-gather",
        "--use-distributed-optimizer",
    )  # fmt: skip
    t = run.train
    assert (t.fp8_format, t.fp8_recipe, t.fp8_margin) == ("hybrid", "tensorwise", 2)
    assert (t.fp8_amax_history_len, t.fp8_amax_compute_algo) == (16, "max")
    assert t.first_last_layers_bf16 and t.fp8_param_gather
    assert (t.num_layers_at_start_in_bf16, t.num_layers_at_end_in_bf16) == (2, 3)
    run.validate(1, require_data=False)  # a legal FP8 setup (the GPU is checked at setup)
    assert fp8_bf16_blocks(run) == {0, 1, 5, 6, 7}


def test_fp8_defaults_are_megatrons():
    t = _run("--fp8-format", "e4m3").train
    assert t.fp8_recipe is None  # = delayed
    assert (t.fp8_margin, t.fp8_amax_history_len, t.fp8_amax_compute_algo) == (0, 1, "most_recent")
    assert not t.first_last_layers_bf16 and not t.fp8_param_gather


def test_fp8_fields_reach_megatrons_transformer_config():
    run = _run(
        "--fp8-format", "hybrid", "--fp8-recipe", "blockwise", "--first-last-layers-bf16",
        "--num-layers-at-end-in-bf16", "2",
    )  # fmt: skip
    f = fp8_fields(run)
    assert f["fp8"] == "hybrid" and f["fp8_recipe"] == "blockwise"
    # megatron counts sub-layers (mixer, MLP): 2 per block
    assert (f["num_layers_at_start_in_bf16"], f["num_layers_at_end_in_bf16"]) == (2, 4)
    tcfg = transformer_config(run)
    assert tcfg.fp8 == "hybrid" and tcfg.fp8_recipe == mcore.Fp8Recipe.blockwise
    assert tcfg.first_last_layers_bf16 and tcfg.num_layers == 16
    assert fp8_fields(_run()) == {}
    assert transformer_config(_run()).fp8 is None


# ---- errors before anything is built ---------------------------------------------------------
@pytest.mark.parametrize(
    "flags, message",
    [
        (["--fp8-format", "e5m2"], "--fp8-format (train.fp8_format)='e5m2': must be one of e4m3, "
         "hybrid"),
        (["--fp8-format", "hybrid", "--fp8-recipe", "nvfp4"],
         "--fp8-recipe (train.fp8_recipe)='nvfp4': must be one of delayed, tensorwise, "
         "blockwise, mxfp8"),
        (["--fp8-format", "hybrid", "--fp8-amax-compute-algo", "mean"],
         "--fp8-amax-compute-algo (train.fp8_amax_compute_algo)='mean': must be max or "
         "most_recent"),
        (["--fp8-format", "hybrid", "--fp8-amax-history-len", "0"],
         "--fp8-amax-history-len (train.fp8_amax_history_len)=0: must be >= 1"),
        (["--fp8-format", "hybrid", "--fp8-margin", "-1"],
         "--fp8-margin (train.fp8_margin)=-1: must be >= 0"),
        (["--fp8-recipe", "delayed"], "--fp8-recipe needs --fp8-format"),
        (["--fp8-param-gather"], "--fp8-param-gather needs --fp8-format"),
        (["--first-last-layers-bf16"], "--first-last-layers-bf16 needs --fp8-format"),
        (["--fp8-format", "hybrid", "--spec", "local"], FP8_NEEDS_TE),
        (["--fp8-format", "hybrid", "--fp32"], "FP8 training keeps bf16 weights"),
        (["--fp8-format", "hybrid", "--fp8-param-gather"],
         "--fp8-param-gather needs --use-distributed-optimizer"),
        (["--fp8-format", "hybrid", "--first-last-layers-bf16"],
         "--first-last-layers-bf16 does not work with --fp8-recipe delayed"),
        (["--fp8-format", "hybrid", "--fp8-recipe", "tensorwise", "--first-last-layers-bf16",
          "--num-layers-at-start-in-bf16", "4", "--num-layers-at-end-in-bf16", "4"],
         "leaves none of the 8 blocks in FP8"),
        (["--fp8-format", "hybrid", "--fp8-recipe", "tensorwise", "--first-last-layers-bf16",
          "--num-layers-at-start-in-bf16", "9"],
         "--num-layers-at-start-in-bf16 (train.num_layers_at_start_in_bf16)=9: must be <= the "
         "blocks per pipeline stage (8)"),
        (["--fp8-format", "hybrid", "--seq-length", "1000"],
         "micro-batch 1 x seq 1000 / CP 1 = 1000) must be a multiple of 16"),
        (["--fp8-format", "hybrid", "--fp8-recipe", "mxfp8", "--seq-length", "1040"],
         "= 1040) must be a multiple of 32"),
    ],
)  # fmt: skip
def test_fp8_errors_name_the_flag(flags, message):
    assert message in _refused(*flags)


def test_unaligned_widths_are_refused_naming_layer_and_width():
    # V = 20: GDN out_proj reads heads x V = 120 features, not a multiple of 16
    msg = _refused("--fp8-format", "hybrid", "model.gdn_head_v_dim=20")
    assert "gdn self_attention.out_proj: input width 120 per TP rank" in msg
    assert "no GEMM is silently run in bf16" in msg
    # hidden 102 (6 heads x 17): every GEMM's input; attention QKV 306 rows
    msg = _refused("--fp8-format", "hybrid", "model.hidden_size=102")
    assert "gdn self_attention.in_proj: input width 102" in msg
    assert "attention self_attention.linear_qkv: output rows 306" in msg
    # at TP 2 the per-rank widths count: MLP 264 -> fc2 reads 132 per rank
    msg = _refused(
        "--fp8-format", "hybrid", "model.intermediate_size=264", "--tensor-model-parallel-size",
        "2", world=2,
    )  # fmt: skip
    assert "mlp mlp.linear_fc2: input width 132 per TP rank" in msg
    # the same model without FP8 is fine
    _run("model.gdn_head_v_dim=20").validate(1, require_data=False)


@pytest.mark.parametrize("preset", ["tiny", "olmo_hybrid_1b", "olmo_hybrid_7b"])
@pytest.mark.parametrize("tp", [1, 2])
def test_presets_are_fp8_aligned_by_construction(preset, tp):
    cfg = get_preset(preset)
    assert cfg.fp8_alignment_problems(tp) == []
    if preset != "tiny":  # (tiny's 144 QKV rows per rank at TP 2 are not a multiple of 32)
        assert cfg.fp8_alignment_problems(tp, align=32) == []  # MXFP8 too


def test_olmo_7b_gdn_in_proj_is_the_grouped_17280_width():
    gdn = {g.name: g for g in get_preset("olmo_hybrid_7b").gemms(1)["gdn"]}
    assert gdn["self_attention.in_proj"].rows == 17280 and 17280 % 16 == 0  # upstream: 17340
    assert gdn["self_attention.ab_proj"].rows == 60 and not gdn["self_attention.ab_proj"].fp8


# ---- environment (setup) ---------------------------------------------------------------------
def test_fp8_without_gpu_or_te_is_refused_at_setup():
    run = _run("--fp8-format", "hybrid")
    run.validate(1, require_data=False)  # plannable (a dry run on a login node)
    preflight.check_fp8_environment(run, dry_run=True)
    if torch.cuda.is_available():
        pytest.skip("needs a host without CUDA")
    with pytest.raises(ConfigError, match="FP8 needs --spec te and Transformer Engine on a GPU"):
        preflight.check_fp8_environment(run)
    assert mcore.fp8_recipe_support("delayed") == (False, "no CUDA device")
    preflight.check_fp8_environment(_run())  # no FP8: nothing to check


def _pretend_hopper(monkeypatch, supported: dict[str, tuple[bool, str]]):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    monkeypatch.setattr(mcore, "te_modules", lambda: None)
    monkeypatch.setattr(mcore, "fp8_recipe_support", lambda r: supported[r])


def test_mxfp8_is_refused_on_hopper_with_a_clear_message(monkeypatch):
    reason = "Device compute capability 10.0 or higher required for MXFP8 execution."
    _pretend_hopper(monkeypatch, {"mxfp8": (False, reason), "delayed": (True, "")})
    run = _run("--fp8-format", "hybrid", "--fp8-recipe", "mxfp8", "--spec", "te")
    run.validate(1, require_data=False)
    with pytest.raises(ConfigError) as e:
        preflight.check_fp8_environment(run)
    msg = str(e.value)
    assert "--fp8-recipe mxfp8 (MXFP8BlockScaling) is not supported on this GPU" in msg
    assert "NVIDIA H200, compute capability 9.0" in msg and reason in msg
    assert "on Hopper use delayed, tensorwise or blockwise" in msg
    preflight.check_fp8_environment(_run("--fp8-format", "hybrid", "--spec", "te"))


def test_unsupported_blockwise_names_tes_reason(monkeypatch):
    reason = "FP8 block scaled GEMM requires compute capability 9.0 or higher and CUDA >= 12.9."
    _pretend_hopper(monkeypatch, {"blockwise": (False, reason)})
    run = _run("--fp8-format", "e4m3", "--fp8-recipe", "blockwise", "--spec", "te")
    with pytest.raises(ConfigError, match="Float8BlockScaling"):
        preflight.check_fp8_environment(run)


def test_fp8_contexts_are_free_without_te():
    # the GDN ab_proj wraps its GEMM in these: null contexts on CPU / without FP8
    with mcore.fp8_disabled(), mcore.fp8_params_disabled():
        pass


# ---- dry run ---------------------------------------------------------------------------------
def test_dry_run_reports_fp8_gemms_and_flops_share(capsys):
    flags = ["--preset", "olmo_hybrid_7b", "--mock-data", "--seq-length", "8192", "--dry-run"]
    assert main([*flags, "--fp8-format", "hybrid"]) == 0
    out = capsys.readouterr().out
    assert (
        "FP8: format hybrid, recipe delayed (Transformer Engine DelayedScaling, margin 0, " in out
    )
    lines = {ln.split("(")[0].strip(): ln.split() for ln in out.splitlines() if ln.startswith("  ")}
    # 24 GDN, 8 attention, 32 MLP blocks; ab_proj and the LM head stay bf16
    assert lines["gdn self_attention.in_proj"][-4:-2] == ["24", "0"]
    assert lines["gdn self_attention.ab_proj"][-4:-2] == ["0", "24"]
    assert lines["attention self_attention.linear_qkv"][-4:-2] == ["8", "0"]
    assert lines["mlp mlp.linear_fc2"][-4:-2] == ["32", "0"]
    assert lines["output output_layer"][-4:-2] == ["0", "1"]
    split = gemm_precision_split(get_preset("olmo_hybrid_7b"), 8192)
    share = f"FP8 share: {100 * split['fp8_share_of_gemms']:.1f}% of the GEMM FLOPs"
    assert share in out and "GDN recurrence (no FP8 GDN core exists)" in out
    assert 0.94 < split["fp8_share_of_gemms"] < 0.95  # ab_proj 0.1%, LM head 5.5% stay bf16

    assert main(flags) == 0  # no FP8: no FP8 section
    assert "FP8:" not in capsys.readouterr().out


def test_dry_run_counts_bf16_first_last_blocks(capsys):
    flags = [*TINY, "--dry-run", "--fp8-format", "hybrid", "--fp8-recipe", "tensorwise"]
    assert main([*flags, "--first-last-layers-bf16", "--num-layers-at-end-in-bf16", "2"]) == 0
    out = capsys.readouterr().out
    assert "recipe tensorwise (Transformer Engine Float8CurrentScaling)" in out
    assert "bf16 blocks: 0, 6, 7" in out
    lines = {ln.split("(")[0].strip(): ln.split() for ln in out.splitlines() if ln.startswith("  ")}
    # blocks 0, 6 (GDN) and 7 (attention) are bf16: GDN 4 of 6 FP8, attention 1 of 2, MLP 5 of 8
    assert lines["gdn self_attention.in_proj"][-4:-2] == ["4", "2"]
    assert lines["attention self_attention.linear_proj"][-4:-2] == ["1", "1"]
    assert lines["mlp mlp.linear_fc1"][-4:-2] == ["5", "3"]


def test_dry_run_refuses_fp8_errors(capsys):
    assert main([*TINY, "--dry-run", "--fp8-format", "hybrid", "--spec", "local"]) == 2
    assert FP8_NEEDS_TE in capsys.readouterr().err


@pytest.mark.parametrize("preset", ["tiny", "olmo_hybrid_1b", "olmo_hybrid_7b"])
def test_gemm_split_adds_up_to_the_flops_model(preset):
    cfg = get_preset(preset)
    fl = flops_per_token(cfg, 4096)
    split = gemm_precision_split(cfg, 4096)
    gemms = sum(fl[k] for k in ("gdn_projections", "attention_projections", "mlp", "output_layer"))
    assert split["gemm_flops"] == pytest.approx(gemms, rel=1e-12)
    assert split["step_flops"] == pytest.approx(fl["total"])
    off = gemm_precision_split(cfg, 4096, fp8=False)
    assert off["fp8_flops"] == 0 and off["gemm_flops"] == pytest.approx(gemms)


# ---- checkpoints: TE _extra_state ------------------------------------------------------------
@pytest.fixture
def fake_te_recipe(monkeypatch):
    """A stand-in ``transformer_engine.common.recipe`` module (TE is absent on CPU) so that a
    delayed-scaling payload of the real shape can be pickled and checked."""
    mod = types.ModuleType("transformer_engine.common.recipe")

    @dataclass
    class DelayedScaling:
        margin: int = 0
        amax_history_len: int = 1024
        amax_compute_algo: str = "max"

    DelayedScaling.__module__ = mod.__name__
    DelayedScaling.__qualname__ = "DelayedScaling"
    mod.DelayedScaling = DelayedScaling
    for name in ("transformer_engine", "transformer_engine.common"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    return mod


def _payload(obj) -> torch.Tensor:
    return torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)


def test_delayed_scaling_payload_passes_the_restricted_unpickler(fake_te_recipe):
    state = {
        "recipe": fake_te_recipe.DelayedScaling(),
        "scale_fwd": torch.ones(3),
        "amax_history_fwd": torch.zeros(4, 3),
        "scale_bwd": torch.ones(2),
        "amax_history_bwd": torch.zeros(4, 2),
        "extra_fp8_variables": {"num_gemms": 1, "fp8_checkpoint": True},
    }
    ckpt.check_extra_state_payload("decoder.layers.0.mlp.linear_fc1._extra_state", _payload(state))
    ckpt.check_extra_state_payload("x._extra_state", torch.empty(0, dtype=torch.uint8))
    ckpt.check_extra_state_payload("x._extra_state", None)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_a_payload_that_could_run_code_is_refused():
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.check_extra_state_payload("decoder.layers.3._extra_state", _payload({"x": _Evil()}))
    msg = str(e.value)
    assert "decoder.layers.3._extra_state: refusing to load" in msg
    assert "Refusing to unpickle disallowed class 'posix.system'" in msg
    assert ckpt.UNSAFE_EXTRA_STATE_ENV in msg


def test_extra_state_is_emptied_for_runs_without_delayed_scaling():
    sd = {
        "a.weight": torch.ones(2),
        "a._extra_state": _payload({"x": _Evil()}),  # never unpickled: dropped
        "b._extra_state": None,
    }
    ckpt.prepare_extra_state(sd, keep=False)
    assert sd["a._extra_state"].numel() == 0 and sd["b._extra_state"].numel() == 0
    assert torch.equal(sd["a.weight"], torch.ones(2))
    with pytest.raises(ckpt.CheckpointError):
        ckpt.prepare_extra_state({"a._extra_state": _payload({"x": _Evil()})}, keep=True)


def test_te_unpickle_opt_in_is_scoped(monkeypatch):
    monkeypatch.delenv(ckpt.UNSAFE_EXTRA_STATE_ENV, raising=False)
    with ckpt._extra_state_opt_in(True):
        assert os.environ[ckpt.UNSAFE_EXTRA_STATE_ENV] == "1"
    assert ckpt.UNSAFE_EXTRA_STATE_ENV not in os.environ
    with ckpt._extra_state_opt_in(False):
        assert ckpt.UNSAFE_EXTRA_STATE_ENV not in os.environ
    monkeypatch.setenv(ckpt.UNSAFE_EXTRA_STATE_ENV, "0")
    with ckpt._extra_state_opt_in(True):
        pass
    assert os.environ[ckpt.UNSAFE_EXTRA_STATE_ENV] == "0"


def test_fp8_delayed_detection_reads_the_model_config():
    class M(torch.nn.Module):
        def __init__(self, fp8, recipe):
            super().__init__()
            self.config = types.SimpleNamespace(fp8=fp8, fp8_recipe=recipe)

    assert ckpt._fp8_delayed([M("hybrid", mcore.Fp8Recipe.delayed)])
    assert ckpt._fp8_delayed([M("e4m3", "delayed")])
    assert not ckpt._fp8_delayed([M("hybrid", "tensorwise")])
    assert not ckpt._fp8_delayed([M(None, "delayed")])
