"""HF conversion both ways (tools/convert_to_hf.py, tools/convert_from_hf.py), CPU, tiny sizes.

(a) a TP2-trained checkpoint exports to a directory transformers loads, with the released key
    names/shapes, and the built-in validation passes; a PP2 x VP2-trained one exports the same.
(b) HF (save_pretrained) -> ours -> HF is bitwise.
(c) the imported checkpoint is continued by the trainer (TP2, bf16, lr 0: weights kept exactly).
(d) bad inputs are one `error:` line naming the key or value, exit status 2.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from megatron_hybrid.conversion.hf_files import normalize_hf_names
from megatron_hybrid.models.olmo_hybrid.hf_mapping import config_from_hf, split_fused_conv
from tests.conftest import ROOT, TINY_HF_CONFIG, TINY_MOCK, run_python, train_cmd
from tests.parallel import train_runs

TRAIN_2 = [*TINY_MOCK, "--train-iters", "2"]


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _read_dir(d) -> dict[str, torch.Tensor]:
    """Every tensor of an HF directory, checking the index covers exactly the files' tensors."""
    index = json.load(open(os.path.join(d, "model.safetensors.index.json")))
    out = {}
    for fname in sorted(set(index["weight_map"].values())):
        with safe_open(os.path.join(d, fname), "pt") as f:
            for k in f.keys():  # noqa: SIM118
                assert index["weight_map"][k] == fname and k not in out
                out[k] = f.get_tensor(k)
    assert sorted(out) == sorted(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in out.values()
    )
    return out


def _hf_raw(**changes) -> dict:
    raw = json.loads(TINY_HF_CONFIG.read_text())
    raw.update(changes)
    return raw


def _random_hf_model(raw: dict, seed: int = 0):
    from transformers import OlmoHybridConfig, OlmoHybridForCausalLM

    torch.manual_seed(seed)
    fields = {k: v for k, v in raw.items() if k != "model_type"}
    model = OlmoHybridForCausalLM(OlmoHybridConfig(**fields)).eval()
    with torch.no_grad():  # norms start at exactly 1: perturb them so a swap cannot hide
        for name, p in model.named_parameters():
            if p.ndim == 1 and name.endswith("weight"):
                p.mul_(1 + 0.2 * torch.randn_like(p))
    return model


def _sentencepiece(tmp) -> str:
    """A 500-piece sentencepiece model trained on this repository's Python sources."""
    from megatron_hybrid.data.tokenizer_training import train_sentencepiece

    corpus = tmp / "corpus.jsonl"
    with open(corpus, "w") as f:
        for path in sorted((ROOT / "megatron_hybrid").rglob("*.py")):
            f.write(json.dumps({"text": path.read_text()}) + "\n")
    return train_sentencepiece([str(corpus)], str(tmp / "tok"), vocab_size=500)


# ---------------------------------------------------------------------------------------------
# (a) trained checkpoint (TP2; PP2 x VP2) -> HF


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trained")
    tp2, pp2 = str(tmp / "tp2"), str(tmp / "pp2vp2")
    # both 2-rank trainings in one launch (tests/parallel/train_runs.py)
    tp2_args = ["--tensor-model-parallel-size", "2", "--save", tp2]
    pp2_args = [
        "--pipeline-model-parallel-size",
        "2",
        "--virtual-pipeline-model-parallel-size",
        "2",
    ]
    _, output = train_runs.launch(
        [[*TRAIN_2, *tp2_args], [*TRAIN_2, *pp2_args, "--save", pp2]], nproc=2, timeout=300
    )
    output(0), output(1)  # asserts the launch succeeded
    return tmp, tp2, pp2


@pytest.fixture(scope="module")
def tp2_export(trained):
    """The TP2 checkpoint exported with a tokenizer, vocabulary cut to it, 1MB shards."""
    tmp, tp2, _ = trained
    tok_model = _sentencepiece(tmp)
    out = str(tmp / "hf_tp2")
    proc = _ok(
        run_python(
            [
                "tools/convert_to_hf.py",
                "--load",
                tp2,
                "--save",
                out,
                "--tokenizer-model",
                tok_model,
                "--hf-vocab-size",
                "tokenizer",
                "--max-shard-size",
                "1MB",
            ]
        )
    )
    return out, proc, tok_model


def test_export_tp2_checkpoint_to_transformers(tp2_export):
    from transformers import AutoModelForCausalLM, AutoTokenizer, OlmoHybridForCausalLM

    out, proc, tok_model = tp2_export
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("VALIDATION OK"), proc.stdout
    assert "next-token agreement 1.0000" in proc.stdout
    assert "8/8 new tokens equal to transformers' generate()" in proc.stdout

    conf = json.load(open(os.path.join(out, "config.json")))
    assert conf["model_type"] == "olmo_hybrid" and conf["architectures"] == [
        "OlmoHybridForCausalLM"
    ]
    assert conf["vocab_size"] == 500  # truncated to the tokenizer (the checkpoint has 512 rows)
    assert conf["layer_types"] == ["linear_attention"] * 3 + ["full_attention"] + [
        "linear_attention"
    ] * 3 + ["full_attention"]
    assert conf["rope_parameters"]["rope_theta"] == 10000.0
    assert conf["torch_dtype"] == conf["dtype"] == "float32"
    assert (conf["eos_token_id"], conf["pad_token_id"]) == (3, 0)  # the sentencepiece ids
    gen = json.load(open(os.path.join(out, "generation_config.json")))
    assert (gen["eos_token_id"], gen["pad_token_id"]) == (3, 0)

    tensors = _read_dir(out)
    assert (
        len(
            set(
                json.load(open(os.path.join(out, "model.safetensors.index.json")))[
                    "weight_map"
                ].values()
            )
        )
        > 1
    )  # sharded at 1MB
    # Released names and shapes: transformers' own model of this config, q/k/v convs split.
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert isinstance(hf, OlmoHybridForCausalLM)
    fresh = OlmoHybridForCausalLM(hf.config)
    want = split_fused_conv(fresh.state_dict(), config_from_hf(conf))
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {
        k: tuple(v.shape) for k, v in want.items()
    }
    assert "model.layers.0.linear_attn.v_conv1d.weight" in tensors
    assert tensors["model.layers.0.linear_attn.v_conv1d.weight"].shape == (6 * 32, 1, 4)
    assert len(tensors) == 6 * 18 + 2 * 11 + 3  # 6 GDN and 2 attention layers
    # What was written is what transformers holds.
    loaded = split_fused_conv(hf.state_dict(), config_from_hf(conf))
    for k, t in tensors.items():
        assert torch.equal(loaded[k], t), k

    # The tokenizer: the sentencepiece model and a transformers tokenizer encoding like it.
    import sentencepiece as spm

    assert os.path.isfile(os.path.join(out, "tokenizer.model"))
    sp = spm.SentencePieceProcessor(model_file=tok_model)
    tok = AutoTokenizer.from_pretrained(out)
    text = open(__file__).read()[:3000]
    assert tok.encode(text, add_special_tokens=False) == sp.encode(text)
    assert tok.eos_token_id == 3 and len(tok) == 500


def test_export_is_the_same_from_any_layout(trained, tp2_export):
    """A PP2 x VP2 run of the same training exports the same weights as the TP2 run (up to the
    float noise between layouts), here in bf16; a resharding mistake would be O(1) off."""
    tmp, _, pp2 = trained
    out = str(tmp / "hf_pp2")
    proc = _ok(
        run_python(["tools/convert_to_hf.py", "--load", pp2, "--save", out, "--dtype", "bf16"])
    )
    assert proc.stdout.strip().splitlines()[-1].startswith("VALIDATION OK"), proc.stdout
    a, b = _read_dir(tp2_export[0]), _read_dir(out)
    assert sorted(a) == sorted(b) and len(a) == 133
    assert json.load(open(os.path.join(out, "config.json")))["dtype"] == "bfloat16"
    for k in a:
        assert b[k].dtype == torch.bfloat16
        ref = b[k].float()[: a[k].shape[0]]  # the TP2 export's vocabulary is cut to 500
        err = (a[k] - ref).norm() / a[k].norm()
        assert err < 1e-2, (k, err.item())


def test_validation_catches_a_wrong_mapping(trained, tmp_path):
    """The built-in validation can fail: an export with swapped a/b projections is caught."""
    _, tp2, _ = trained
    code = (
        "import sys\n"
        "import megatron_hybrid.conversion.cli as cv\n"
        "import megatron_hybrid.conversion.hf_export as ex\n"
        "orig = ex.megatron_to_hf\n"
        "def broken(sd, cfg, hf_vocab_size=None):\n"
        "    out = orig(sd, cfg, hf_vocab_size)\n"
        "    a, b = 'model.layers.0.linear_attn.a_proj.weight', 'model.layers.0.linear_attn.b_proj.weight'\n"
        "    out[a], out[b] = out[b], out[a]\n"
        "    return out\n"
        "ex.megatron_to_hf = broken\n"
        f"sys.exit(cv.main_to_hf(['--load', '{tp2}', '--save', '{tmp_path / 'out'}']))\n"
    )
    proc = run_python(["-c", code])
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stdout.strip().splitlines()[-1].startswith("VALIDATION FAIL: logits differ")


# ---------------------------------------------------------------------------------------------
# (b) HF -> ours -> HF, (c) continue training from the import


@pytest.fixture(scope="module")
def hf_round_trip(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hf")
    raw = _hf_raw(
        rope_parameters={"rope_type": "default", "rope_theta": None},  # NoPE, as released
        num_key_value_heads=2,  # GQA (3 query heads per group)
    )
    model = _random_hf_model(raw)
    src = tmp / "src"
    model.save_pretrained(src, max_shard_size="1MB")
    ours, back = str(tmp / "ours"), str(tmp / "back")
    imp = _ok(run_python(["tools/convert_from_hf.py", "--hf-model", str(src), "--save", ours]))
    exp = _ok(
        run_python(
            ["tools/convert_to_hf.py", "--load", ours, "--save", back, "--max-shard-size", "1MB"]
        )
    )
    return tmp, raw, model, src, ours, back, imp, exp


def test_hf_to_ours_to_hf_is_bitwise(hf_round_trip):
    from transformers import AutoModelForCausalLM

    tmp, raw, model, src, ours, back, imp, exp = hf_round_trip
    assert "weights-only checkpoint" in imp.stdout
    assert exp.stdout.strip().splitlines()[-1].startswith("VALIDATION OK"), exp.stdout
    cfg = config_from_hf(raw)
    want = split_fused_conv(model.state_dict(), cfg)  # the released on-disk form
    got = _read_dir(back)
    assert sorted(got) == sorted(want) and len(got) == 3 * 18 + 11 + 3
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    reloaded = AutoModelForCausalLM.from_pretrained(back, dtype=torch.float32).state_dict()
    for k, t in model.state_dict().items():
        assert torch.equal(reloaded[k], t), k
    conf = json.load(open(os.path.join(back, "config.json")))
    assert conf["rope_parameters"] == {"rope_theta": None}
    for key in ("layer_types", "num_key_value_heads", "linear_key_head_dim", "pad_token_id"):
        assert conf[key] == raw[key], key
    run_cfg = json.load(open(os.path.join(ours, "iter_0000000", "run_config.json")))
    assert run_cfg["model"]["num_key_value_heads"] == 2 and run_cfg["model"]["rope_theta"] is None


def test_reads_what_transformers_save_pretrained_writes(hf_round_trip):
    """transformers 5.24 writes the GDN pre-norms under legacy names and the q/k/v convs as
    three equal thirds; both are read back into the released layout, bitwise."""
    _, raw, model, src, *_ = hf_round_trip
    files = {}
    for name in os.listdir(src):
        if name.endswith(".safetensors"):
            files.update(load_file(os.path.join(src, name)))
    assert "model.layers.0.attention_layer_norm.weight" in files
    assert files["model.layers.0.linear_attn.q_conv1d.weight"].shape[0] == (16 + 16 + 32) * 6 // 3
    cfg = config_from_hf(raw)
    norm = normalize_hf_names(files, cfg)
    want = split_fused_conv(model.state_dict(), cfg)
    assert sorted(norm) == sorted(want)
    for k in want:
        assert torch.equal(norm[k], want[k]), k
    assert normalize_hf_names(want, cfg).keys() == want.keys()  # released layout unchanged


def test_trainer_continues_from_imported_checkpoint(hf_round_trip):
    """Import the released-layout export of (b), continue with the trainer at TP2 in bf16 for one
    step at learning rate 0: the next checkpoint still holds exactly the HF weights (so the
    loaded weights reach the optimizer's fp32 main copies too)."""
    tmp, raw, model, src, ours, back, *_ = hf_round_trip
    ours2, cont, out = str(tmp / "ours2"), str(tmp / "cont"), str(tmp / "cont_hf")
    _ok(
        run_python(
            [
                "tools/convert_from_hf.py",
                "--hf-model",
                back,
                "--save",
                ours2,
                "--tensor-model-parallel-size",
                "2",
            ]
        )
    )
    args = [
        "--config",
        os.path.join(ours2, "iter_0000000", "run_config.json"),
        "--load",
        ours2,
        "--save",
        cont,
        "--mock-data",
        "--seq-length",
        "64",
        "--global-batch-size",
        "2",
        "--micro-batch-size",
        "1",
        "--train-iters",
        "1",
        "--lr",
        "0",
        "--min-lr",
        "0",
        "--bf16",
        "--tensor-model-parallel-size",
        "2",
    ]
    proc = _ok(run_python(train_cmd(*args), nproc=2))
    assert "at iteration 0" in proc.stdout and "iteration        1/       1" in proc.stdout
    assert open(os.path.join(cont, "latest_checkpointed_iteration.txt")).read() == "1"
    _ok(run_python(["tools/convert_to_hf.py", "--load", cont, "--save", out, "--skip-validation"]))
    got = _read_dir(out)
    want = split_fused_conv(model.state_dict(), config_from_hf(raw))
    assert sorted(got) == sorted(want)
    for k in want:
        assert torch.equal(got[k], want[k].bfloat16()), k


# ---------------------------------------------------------------------------------------------
# (d) bad inputs


def _broken_copy(back, tmp, name, fn):
    d = tmp / name
    shutil.copytree(back, d)
    fn(d)
    return d


def _edit_tensor(d, key, change):
    index = json.load(open(d / "model.safetensors.index.json"))
    fname = d / index["weight_map"][key]
    tensors = load_file(fname)
    change(tensors, index)
    save_file(tensors, fname, metadata={"format": "pt"})
    json.dump(index, open(d / "model.safetensors.index.json", "w"))


def _model_type(d):
    conf = json.load(open(d / "config.json"))
    conf["model_type"] = "llama"
    json.dump(conf, open(d / "config.json", "w"))


def _missing(d):
    key = "model.layers.1.linear_attn.b_proj.weight"

    def change(tensors, index):
        del tensors[key]
        del index["weight_map"][key]

    _edit_tensor(d, key, change)


def _misshaped(d):
    key = "model.layers.3.self_attn.k_norm.weight"

    def change(tensors, index):
        tensors[key] = tensors[key][:-1].clone()

    _edit_tensor(d, key, change)


def _unexpected(d):
    extra = "model.layers.9.extra.weight"

    def change(tensors, index):
        tensors[extra] = torch.zeros(2)
        index["weight_map"][extra] = index["weight_map"]["model.norm.weight"]

    _edit_tensor(d, "model.norm.weight", change)


BAD = {
    "wrong_model_type": (_model_type, "model_type='llama'"),
    "missing_tensor": (_missing, "missing tensor 'model.layers.1.linear_attn.b_proj.weight'"),
    "misshaped_tensor": (
        _misshaped,
        "'model.layers.3.self_attn.k_norm.weight' has shape (31,), expected (32,)",
    ),
    "unexpected_tensor": (_unexpected, "unexpected HF tensor(s), e.g. ['model.layers.9.extra"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_hf_input_is_one_line_error(hf_round_trip, case):
    tmp, *_, back, _imp, _exp = hf_round_trip
    fn, needle = BAD[case]
    d = _broken_copy(back, tmp, f"bad_{case}", fn)
    proc = run_python(["tools/convert_from_hf.py", "--hf-model", str(d), "--save", str(tmp / case)])
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(tmp / case / "latest_checkpointed_iteration.txt")


def test_bad_export_input_is_one_line_error(tmp_path):
    proc = run_python(["tools/convert_to_hf.py", "--load", str(tmp_path), "--save", "x"])
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --load"), proc.stderr
    assert "Traceback" not in proc.stderr


def test_7b_config_and_layout_are_the_released_ones():
    """The 7B preset's exported config builds transformers' model whose on-disk form is the
    released 523 tensors (7,430,870,688 parameters) and maps both ways (meta tensors, no data)."""
    from transformers import OlmoHybridConfig, OlmoHybridForCausalLM

    from megatron_hybrid.conversion.hf_files import export_config_dict
    from megatron_hybrid.models.olmo_hybrid.hf_mapping import hf_to_megatron, megatron_to_hf
    from megatron_hybrid.models.olmo_hybrid.presets import olmo_hybrid_7b

    cfg = olmo_hybrid_7b()
    conf = export_config_dict(cfg, cfg.vocab_size, torch.bfloat16, 100257, 100277)
    assert conf["rope_parameters"] == {"rope_theta": None} and conf["torch_dtype"] == "bfloat16"
    skip = ("model_type", "architectures", "transformers_version", "torch_dtype")
    hf_cfg = OlmoHybridConfig(**{k: v for k, v in conf.items() if k not in skip})
    with torch.device("meta"):
        model = OlmoHybridForCausalLM(hf_cfg)
    assert model.model.rotary_emb is None  # NoPE
    disk = split_fused_conv(model.state_dict(), cfg)
    assert len(disk) == 523 and sum(t.numel() for t in disk.values()) == 7_430_870_688
    assert disk["model.layers.0.linear_attn.v_conv1d.weight"].shape == (5760, 1, 4)
    back = megatron_to_hf(hf_to_megatron(disk, cfg), cfg)
    assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in disk.items()}
    assert config_from_hf(conf) == cfg
