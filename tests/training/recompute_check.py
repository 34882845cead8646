"""Activation recompute on a tiny Olmo-Hybrid model, in one process (the CPU shim patches
torch.cuda process-wide, so tests/training/test_recompute.py runs this as a subprocess).

For every recompute setting: the model is built through the training setup code
(``model_setup.transformer_config`` / ``build_model_chunks``'s ``build_model``) with the same
seed, run forward + backward on one packed row of two documents, and compared with the run
without recompute: loss and every parameter gradient. Also recorded: how often the recomputed
parts ran (forward hooks / call counters: a recomputed part runs twice per step) and the bytes
autograd keeps saved after the forward. Prints one JSON object per line:
``{"name", "loss", "max_grad_diff", "calls", "saved_bytes"}``.

    python -m tests.training.recompute_check [--backend torch|triton] [--pattern G-*-G-G-]
        [--seq 48] [--cases NAME ...] [--model model.FIELD=VALUE ...]
    TRITON_INTERPRET=1 python -m tests.training.recompute_check --triton
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from megatron_hybrid.data.batches import packed_seq_params
from megatron_hybrid.layers import attention as attention_mod
from megatron_hybrid.layers import gdn as gdn_mod
from megatron_hybrid.models.olmo_hybrid.model import build_model
from megatron_hybrid.parallel import state
from megatron_hybrid.training.cli import parse
from megatron_hybrid.training.model_setup import layer_pattern, transformer_config

CASES = {
    "none": [],
    "full_uniform_1": ["--recompute-granularity", "full", "--recompute-method", "uniform",
                       "--recompute-num-layers", "1"],
    "full_uniform_2": ["--recompute-granularity", "full", "--recompute-method", "uniform",
                       "--recompute-num-layers", "2"],
    "full_block_1": ["--recompute-granularity", "full", "--recompute-method", "block",
                     "--recompute-num-layers", "1"],
    "selective_default": ["--recompute-granularity", "selective"],
    "selective_core_attn": ["--recompute-granularity", "selective", "--recompute-modules",
                            "core_attn"],
    "selective_gdn": ["--recompute-granularity", "selective", "--recompute-modules", "gdn"],
    "selective_mlp": ["--recompute-granularity", "selective", "--recompute-modules", "mlp"],
    "selective_layernorm": ["--recompute-granularity", "selective", "--recompute-modules",
                            "layernorm"],
    "selective_all": ["--recompute-granularity", "selective", "--recompute-modules", "core_attn",
                      "gdn", "mlp", "layernorm"],
}  # fmt: skip


class Counter:
    """Counts calls of the parts recompute re-runs: sub-layers, core attention, the GDN
    kernel, MLPs and block norms (forward hooks + a wrapper on the kernel entry point)."""

    def __init__(self, model):
        self.calls = {"layer": 0, "core_attn": 0, "gdn_kernel": 0, "mlp": 0, "norm": 0}
        stack = model.decoder
        for layer in stack.layers:
            layer.register_forward_hook(self._hook("layer"))
            sa = getattr(layer, "self_attention", None)
            if isinstance(sa, attention_mod.OlmoSelfAttention):
                sa.core_attention.register_forward_hook(self._hook("core_attn"))
                sa.post_norm.register_forward_hook(self._hook("norm"))
            if hasattr(layer, "input_layernorm") and not isinstance(
                sa, attention_mod.OlmoSelfAttention
            ):
                layer.input_layernorm.register_forward_hook(self._hook("norm"))
            if hasattr(layer, "mlp") and hasattr(layer, "norm"):  # OlmoMLPLayer
                layer.mlp.register_forward_hook(self._hook("mlp"))
                layer.norm.register_forward_hook(self._hook("norm"))

    def _hook(self, key):
        def hook(*_):
            self.calls[key] += 1

        return hook


def run_case(flags, backend, pattern, seq, model_overrides, flavour="local"):
    argv = ["--preset", "tiny", "--seq-length", str(seq), "--hybrid-layer-pattern", pattern]
    argv += ["--fp32", f"model.gdn_backend={backend}", *model_overrides, *flags]
    run, _ = parse(argv)
    run.validate(1, require_data=False)
    tcfg = transformer_config(run)
    model = build_model(
        run.model,
        tcfg,
        flavour=flavour,
        pattern=layer_pattern(run),
        seed=run.train.seed,
        recompute_modules=run.recompute.selective_modules(),
    )
    model.train()
    counter = Counter(model)
    kernel_calls = [0]
    real_kernel = gdn_mod.chunk_gated_delta_rule

    def counting_kernel(*a, **k):
        kernel_calls[0] += 1
        return real_kernel(*a, **k)

    gdn_mod.chunk_gated_delta_rule = counting_kernel
    gen = torch.Generator().manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    tokens = torch.randint(0, run.model.vocab_size, (1, seq), generator=gen).to(dev)
    weights = torch.randn(1, seq, run.model.vocab_size, generator=gen).to(dev)
    docs = [0, seq * 5 // 12, seq]
    psp = packed_seq_params(torch.tensor(docs, dtype=torch.int32, device=dev), seq)
    pos = torch.arange(seq, device=dev).unsqueeze(0)

    saved = []

    def pack(t):
        saved.append(t)
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logits = model(tokens, pos, None, packed_seq_params=psp)  # [b, s, V]
            loss = (logits.float().log_softmax(-1) * weights).sum() / seq
        storages = {}
        for t in saved:
            st = t.untyped_storage()
            storages[st.data_ptr() or id(st)] = st.nbytes()
        saved_bytes = sum(storages.values())
        saved.clear()
        loss.backward()
    finally:
        gdn_mod.chunk_gated_delta_rule = real_kernel
    counter.calls["gdn_kernel"] = kernel_calls[0]
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return float(loss), grads, counter.calls, saved_bytes


# The same through our Triton GDN kernels in Triton's CPU interpreter: one block, one head, one
# 16-token chunk (the interpreter is slow), selective gdn and full recompute.
TRITON = dict(
    backend="triton",
    pattern="G-",
    seq=16,
    model=["model.gdn_num_heads=1", "model.num_attention_heads=1", "model.num_key_value_heads=1"],
    cases=["selective_gdn", "full_uniform_1"],
)


def compare(prefix, cases, backend, pattern, seq, model, flavour="local"):
    common = (backend, pattern, seq, model, flavour)
    ref_loss, ref_grads, _, _ = run_case([], *common)
    for name in cases:
        loss, grads, calls, saved_bytes = run_case(CASES[name], *common)
        assert grads.keys() == ref_grads.keys()
        diff = max((grads[n] - ref_grads[n]).abs().max().item() for n in grads)
        scale = max(g.abs().max().item() for g in ref_grads.values())
        row = dict(
            name=prefix + name,
            loss=loss,
            ref_loss=ref_loss,
            max_grad_diff=diff,
            grad_scale=scale,
            calls=calls,
            saved_bytes=saved_bytes,
        )
        print(json.dumps(row), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--pattern", default="G-*-G-G-")
    ap.add_argument("--seq", type=int, default=48)
    ap.add_argument("--cases", nargs="*", default=list(CASES))
    ap.add_argument("--model", nargs="*", default=[], help="model.FIELD=VALUE overrides")
    ap.add_argument("--triton", action="store_true", help="only the TRITON cases (interpreter)")
    ap.add_argument("--flavour", default="local", help="layer spec: local | te (GPU)")
    args = ap.parse_args()
    torch.use_deterministic_algorithms(True)
    state.initialize(state.ParallelLayout())
    if args.triton:
        # the whole process in interpreter mode (then the conv and norm run in Triton too)
        assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
        compare("triton_", **TRITON)
    else:
        compare("", args.cases, args.backend, args.pattern, args.seq, args.model, args.flavour)
    state.destroy()


if __name__ == "__main__":
    main()
