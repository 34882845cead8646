"""tools/generate.py: recurrent-state decoding equals transformers' generate, and evaluation.

References no one here wrote: transformers' OlmoHybridForCausalLM (its own cached decode path
for generate, and its full forward for the loss). The checkpoints come from random HF models
through tools/convert_from_hf.py, one of them saved at TP 2 (generation loads any layout into
one process).
"""

from __future__ import annotations

import functools
import json
import re

import pytest
import torch

from tests.conftest import TINY_HF_CONFIG, concurrently, run_python


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _generated(stdout: str) -> list[list[int]]:
    return [
        [int(t) for t in m.split(",") if t]
        for m in re.findall(r"^GENERATED ids=(.*)$", stdout, re.M)
    ]


VARIANTS = {
    # RoPE, multi-head attention, checkpoint saved at TP 2
    "rope_tp2": ({}, ["--tensor-model-parallel-size", "2"]),
    # NoPE (as released) with grouped-query attention, attention layer first
    "nope_gqa": (
        {
            "rope_parameters": {"rope_type": "default", "rope_theta": None},
            "num_key_value_heads": 2,
            "layer_types": [
                "full_attention", "linear_attention", "linear_attention", "full_attention"
            ],
        },
        [],
    ),
}  # fmt: skip


def _hf_model(changes: dict, seed: int = 0):
    from transformers import OlmoHybridConfig, OlmoHybridForCausalLM

    raw = json.loads(TINY_HF_CONFIG.read_text())
    raw.update(changes)
    # a larger init than the default 0.02 gives peaked next-token distributions, so the greedy
    # comparison tests the decode path instead of fp32 rounding in near-ties
    raw["initializer_range"] = 0.15
    torch.manual_seed(seed)
    fields = {k: v for k, v in raw.items() if k != "model_type"}
    return OlmoHybridForCausalLM(OlmoHybridConfig(**fields)).eval()


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def converted(request, tmp_path_factory):
    changes, layout = VARIANTS[request.param]
    tmp = tmp_path_factory.mktemp(request.param)
    hf = _hf_model(changes)
    hf.save_pretrained(tmp / "hf")
    ckpt = str(tmp / "ckpt")
    _ok(
        run_python(
            ["tools/convert_from_hf.py", "--hf-model", str(tmp / "hf"), "--save", ckpt, *layout]
        )
    )
    return hf, ckpt, tmp, request.param


PROMPTS = ["5,9,14,200,31,7,77,402,3,18,99,250", "300", "11,12,13,14,15,16,17,18"]


def hf_greedy(hf, prompt_ids: str, new: int, eos=None) -> list[int]:
    """transformers' greedy ``generate`` (its cached decode path) of comma-separated ids."""
    prompt = torch.tensor([[int(t) for t in prompt_ids.split(",")]])
    with torch.no_grad():
        out = hf.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new,
            do_sample=False, pad_token_id=hf.config.pad_token_id, eos_token_id=eos,
        )  # fmt: skip
    return out[0, prompt.shape[1] :].tolist()


def test_greedy_equals_transformers_generate(converted):
    hf, ckpt, _, _ = converted
    new = 24
    args = ["tools/generate.py", "--load", ckpt, "--greedy", "--max-new-tokens", str(new)]
    for p in PROMPTS:
        args += ["--prompt-ids", p]
    proc = _ok(run_python([*args, "--ignore-eos"]))
    ours = _generated(proc.stdout)
    assert len(ours) == len(PROMPTS)
    for p, mine in zip(PROMPTS, ours):
        theirs = hf_greedy(hf, p, new)
        assert mine == theirs, f"prompt {p}: ours {mine} vs transformers {theirs}"
        # the comparison is meaningful: the model does not just repeat one token
        assert len(set(theirs)) > 3
    assert "tokens/s" in proc.stdout


def _stdout(args: list[str]) -> str:
    return _ok(run_python(args)).stdout


def test_stops_at_eos_and_sampling_is_seeded(converted):
    hf, ckpt, _, variant = converted
    if variant != "rope_tp2":
        pytest.skip("decoding-control test runs on one variant (keeps CI time down)")
    base = ["tools/generate.py", "--load", ckpt, "--prompt-ids", "5,9,14", "--max-new-tokens"]
    sample = [*base, "30", "--ignore-eos", "--temperature", "1.5", "--top-p", "0.95", "--top-k"]
    # five independent 1-rank processes: at the same time (one core each)
    greedy, stopped, a, b, c = concurrently(
        *(
            functools.partial(_stdout, args)
            for args in (
                [*base, "40", "--ignore-eos"],
                [*base, "40"],
                [*sample, "50", "--seed", "3"],
                [*sample, "50", "--seed", "3", "--prompt-ids", "1,2"],
                [*sample, "50", "--seed", "4"],
            )
        )
    )
    greedy, stopped = _generated(greedy)[0], _generated(stopped)[0]
    eos = 2  # the fixture config's eos_token_id
    if eos in greedy:
        assert stopped == greedy[: greedy.index(eos) + 1]
    else:
        assert stopped == greedy
    # and transformers stops at the same place
    assert hf_greedy(hf, "5,9,14", 40, eos=eos)[: len(stopped)] == stopped
    assert _generated(a)[0] == _generated(b)[0]
    assert _generated(a)[0] != _generated(c)[0]
    assert _generated(a)[0] != greedy[:30]
    assert all(0 <= t < 512 for t in _generated(a)[0])


def _sentencepiece(tmp) -> str:
    from megatron_hybrid.data.tokenizer_training import train_sentencepiece

    corpus = tmp / "corpus.jsonl"
    root = TINY_HF_CONFIG.parents[2]
    with open(corpus, "w") as f:
        for path in sorted((root / "megatron_hybrid").rglob("*.py")):
            f.write(json.dumps({"text": path.read_text()}) + "\n")
    return train_sentencepiece([str(corpus)], str(tmp / "tok"), vocab_size=500)


def test_eval_perplexity_equals_transformers_loss(converted):
    hf, ckpt, tmp, _ = converted
    tok = _sentencepiece(tmp)
    root = TINY_HF_CONFIG.parents[2]
    texts = [(root / "README.md").read_text()[:1500], "def f(x):\n    return x + 1\n"]
    heldout = tmp / "heldout.jsonl"
    heldout.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    base = ["tools/generate.py", "--load", ckpt, "--tokenizer-model", tok]
    base += ["--eval-file", str(heldout), "--no-progress"]
    prefix = str(tmp / "heldout")

    def indexed_eval():
        """the same documents preprocessed like training data (no tokenizer needed to evaluate
        them)"""
        pre = ["tools/preprocess_data.py", "--input", str(heldout), "--output-prefix", prefix]
        pre += ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", tok]
        _ok(run_python([*pre, "--append-eod", "--no-progress"]))
        indexed = ["tools/generate.py", "--load", ckpt, "--no-progress", "--eval-file"]
        return _ok(run_python([*indexed, prefix + "_text_document"])).stdout

    # three independent chains of 1-rank processes: at the same time (one core each)
    whole, chunked, indexed = concurrently(
        functools.partial(_stdout, [*base, "--eval-window", "4096"]),
        functools.partial(_stdout, [*base, "--eval-window", "37"]),
        indexed_eval,
    )

    def parse(out):
        m = re.search(r"^EVAL documents=(\d+) tokens=(\d+) loss=([0-9.]+) perplexity=", out, re.M)
        assert m, out
        return int(m[1]), int(m[2]), float(m[3])

    docs, tokens, loss = parse(whole)
    assert docs == 2 and parse(chunked)[:2] == (docs, tokens)
    assert parse(indexed)[:2] == (docs, tokens)
    assert abs(parse(indexed)[2] - loss) < 1e-6 * max(1.0, loss)
    # state carried across windows: the same loss as reading each document in one piece
    assert abs(parse(chunked)[2] - loss) < 1e-5 * max(1.0, loss)

    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=tok)
    nll, n = 0.0, 0
    for t in texts:
        ids = torch.tensor([sp.encode(t) + [sp.eos_id()]])
        with torch.no_grad():
            logits = hf(ids).logits[0, :-1].float()
        nll += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        n += ids.shape[1] - 1
    assert n == tokens
    assert abs(nll / n - loss) < 1e-4 * loss, (nll / n, loss)


BAD_INPUTS = [
    (["--prompt-ids", "5,9,100000"], "outside the model's vocabulary"),
    (["--prompt-ids", "5,x"], "comma-separated integers"),
    (["--prompt", "hello"], "needs a tokenizer"),
    (["--eval-file", "/nonexistent.jsonl"], "no such file"),
    (["--eval-file", "BAD"], "bad.jsonl:2: not JSON"),
    (["--eval-file", "HALF"], "half.idx not found"),
    (["--load-iteration-typo"], None),
]


@pytest.fixture(scope="module")
def bad_input_runs(converted):
    """tools/generate.py on each of BAD_INPUTS (nope_gqa only), all at the same time (one core
    each; they are independent): extra -> the finished process."""
    _, ckpt, tmp, variant = converted
    if variant != "nope_gqa":
        pytest.skip("argument checks run on one variant (keeps CI time down)")
    bad = tmp / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": broken\n')
    (tmp / "half.bin").write_bytes(b"")  # an indexed dataset without its index

    def run(extra):
        extra = [str(bad) if e == "BAD" else str(tmp / "half") if e == "HALF" else e for e in extra]
        return run_python(["tools/generate.py", "--load", ckpt, *extra])

    procs = concurrently(*(functools.partial(run, extra) for extra, _ in BAD_INPUTS))
    return {tuple(extra): proc for (extra, _), proc in zip(BAD_INPUTS, procs)}


@pytest.mark.parametrize("extra, message", BAD_INPUTS)
def test_bad_input_is_one_line_error(bad_input_runs, extra, message):
    proc = bad_input_runs[tuple(extra)]
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    if message is not None:
        lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and message in lines[0], proc.stderr[-2000:]


INCREMENTAL = """
import sys, torch
from megatron_hybrid.conversion.saved_checkpoints import load_session
from megatron_hybrid.parallel import state as st
s = load_session(sys.argv[1])
ids = torch.randint(0, 500, (2, 41), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    full = s.model(ids, torch.arange(41)[None].expand(2, 41), None).float()
dec, cache = s.decoder, s.decoder.new_state()
parts = [dec.forward(ids[:, :17], cache)]  # prompt chunk
parts += [dec.forward(ids[:, t : t + 1], cache) for t in range(17, 30)]  # single steps
parts += [dec.forward(ids[:, 30:33], cache), dec.forward(ids[:, 33:], cache)]  # chunks again
inc = torch.cat(parts, 1)
print("MAXDIFF", (inc - full).abs().max().item(), full.abs().max().item())
st.destroy()
"""


def test_incremental_decoding_equals_the_full_forward(converted):
    """Chunks and single steps from the cached state give the training forward's logits."""
    _, ckpt, _, _ = converted
    proc = _ok(run_python(["-c", INCREMENTAL, ckpt]))
    diff, scale = map(float, re.search(r"MAXDIFF (\S+) (\S+)", proc.stdout).groups())
    assert diff < 1e-4 * max(1.0, scale), (diff, scale)
