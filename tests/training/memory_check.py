"""Bytes autograd keeps after the forward of the tiny model, per recompute setting: what
training/memory.py's activation and logits terms must match (tests/training/
test_memory_estimate.py runs this as a subprocess: the CPU shim patches torch.cuda
process-wide, and Triton's interpreter mode is process-wide).

The model is built through the training setup code (``transformer_config``, ``build_model``)
in bf16 and run forward on one 64-token row (one document: GDN's one chunk is full, as the
estimate's per-token chunk terms assume for long documents), then through the trainer's loss
(the fused, chunked LM head + loss by default, which keeps the input gradient it computed in the
forward; with ``--lm-head-loss-chunk-tokens 0`` ``masked_lm_loss``, whose cross-entropy kernel
keeps the logits for its in-place backward). Every
tensor saved for the backward is collected with ``saved_tensors_hooks``; the result is the sum of
their distinct storages (at their size after the forward: layernorm recompute frees storage),
parameters excluded. Prints one JSON object per case: ``{"name", "spec", "flags", "bytes"}``.

Our GPU kernels run as they do on a GPU: Triton's interpreter (TRITON_INTERPRET=1) runs the GDN
kernel, the gated norm, the SwiGLU, the L2 norms and the loss kernel, so their autograd functions
save what they save on a GPU. Three stand-ins, each keeping the real autograd code around it:

- the conv's forward *kernel* is computed by torch (the interpreter spends ~80% of the forward
  there); ``conv_triton._CausalConv1dFn`` and what it saves are unchanged;
- ``--spec te``: Transformer Engine's RMSNorm (saves its input, weight and fp32 rstd) and fused
  attention (q, k, v, output, fp32 softmax statistics [b, heads, s]), which need a GPU; they
  replace our torch RMSNorm and SDPA attention in the layer spec, everything else is the code
  of the te spec (megatron's linears save their input as TE's do);
- ``--spec local``: the local spec as it is (torch RMSNorm, torch SDPA).

    TRITON_INTERPRET=1 python -m tests.training.memory_check [--spec te|local] [--cases ...]
    TRITON_INTERPRET=1 torchrun --nproc-per-node 2 -m tests.training.memory_check --tp 2 --sp
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F

from megatron_hybrid import mcore
from megatron_hybrid.data.batches import packed_seq_params
from megatron_hybrid.kernels import conv_triton
from megatron_hybrid.layers.attention import TorchCausalAttention
from megatron_hybrid.layers.norms import RMSNorm
from megatron_hybrid.layers.output_loss import deferred_logits, output_layer_of
from megatron_hybrid.models.olmo_hybrid import specs
from megatron_hybrid.models.olmo_hybrid.model import build_model
from megatron_hybrid.parallel import state
from megatron_hybrid.training.cli import parse
from megatron_hybrid.training.loss import masked_lm_head_loss, masked_lm_loss
from megatron_hybrid.training.model_setup import layer_pattern, transformer_config
from tests.training.recompute_check import CASES as RECOMPUTE_CASES

# The tiny preset with 2 GDN heads (the interpreter's time grows with heads) and GQA attention
# (6 query heads, 2 KV heads; RoPE), 3 GDN blocks and 1 attention block.
BASE = ["--preset", "tiny", "--seq-length", "64", "--hybrid-layer-pattern", "G-*-G-G-", "--bf16",
        "model.gdn_num_heads=2", "model.num_key_value_heads=2"]  # fmt: skip
DOCS = [0, 64]


class _TorchConvKernel:
    """``_conv4_fwd_kernel[grid](...)`` computed by torch (same numbers as the kernel)."""

    def __getitem__(self, grid):
        def run(x, w, h, start, y, T, C, W, HAS_INIT, HAS_DOCS, SILU, **_):
            xf, wf = x.float(), w.float()
            hist = h.float() if HAS_INIT else xf.new_zeros(x.shape[0], W - 1, C)
            xp, t = torch.cat([hist, xf], 1), torch.arange(T)
            acc = xf * wf[:, W - 1]
            for d in range(1, W):
                tap = xp[:, W - 1 - d : W - 1 - d + T]
                if HAS_DOCS:
                    tap = tap * (t - d >= start.long()).float()[None, :, None]
                acc = acc + tap * wf[:, W - 1 - d]
            y.copy_(F.silu(acc) if SILU else acc)

        return run


class _TENormFn(torch.autograd.Function):
    """RMSNorm saving what Transformer Engine's does: input, weight, fp32 rstd per row."""

    @staticmethod
    def forward(ctx, x, w, eps):
        rstd = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, w, rstd.squeeze(-1))
        return (w * (x.float() * rstd)).to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        raise NotImplementedError("forward-only stand-in (memory measurement)")


class TENormLike(RMSNorm):
    def forward(self, x):
        return _TENormFn.apply(x, self.weight, self.eps)


class _FusedAttentionFn(torch.autograd.Function):
    """Core attention saving what TE's fused/flash attention does: q, k, v, the output (the
    tensor o_proj gets) and fp32 softmax statistics [b, heads, s]."""

    @staticmethod
    def forward(ctx, q, k, v, attend):
        with torch.no_grad():
            out = attend(q, k, v)
        s, b, n = q.shape[:3]
        ctx.save_for_backward(q, k, v, out, torch.empty(b, n, s, dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, do):
        raise NotImplementedError("forward-only stand-in (memory measurement)")


class FusedAttentionLike(TorchCausalAttention):
    def forward(self, q, k, v, attention_mask=None, **kw):
        def attend(q, k, v):
            return super(FusedAttentionLike, self).forward(q, k, v, attention_mask, **kw)

        return _FusedAttentionFn.apply(q, k, v, attend)


# the recompute settings, and the unfused head (megatron's output layer + the loss kernel on the
# whole logits) without recompute
CASES = {**RECOMPUTE_CASES, "unfused_head": ["--lm-head-loss-chunk-tokens", "0"]}


def kept_bytes(flags: list[str], world: int) -> int:
    """Bytes this rank keeps after the forward and the loss of one micro-batch."""
    run, _ = parse([*BASE, *flags])
    run.validate(world, require_data=False)
    model = build_model(
        run.model, transformer_config(run), flavour="local", pattern=layer_pattern(run),
        seed=run.train.seed, recompute_modules=run.recompute.selective_modules(),
    )  # fmt: skip
    model.train()
    seq, vocab = run.data.seq_length, run.model.vocab_size
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (1, seq), generator=gen)
    labels = torch.randint(0, vocab, (1, seq), generator=gen)
    psp = packed_seq_params(torch.tensor(DOCS, dtype=torch.int32), seq)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = []

    def pack(t):
        saved.append(t)
        return t

    tp_group = mcore.parallel_state.get_tensor_model_parallel_group() if world > 1 else None
    chunk = run.train.lm_head_loss_chunk_tokens
    weight = output_layer_of(model).weight
    weight.main_grad = torch.zeros(weight.shape)  # as under megatron's DDP (the trainer's case)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if chunk:
            with deferred_logits([model]):
                hidden = model(tokens, torch.arange(seq)[None], None, packed_seq_params=psp)
            masked_lm_head_loss(
                hidden, weight, labels, torch.ones(1, seq), 1e-5, tp_group,
                sequence_parallel=run.parallel.sequence_parallel, chunk_tokens=chunk,
            )  # fmt: skip
        else:
            logits = model(tokens, torch.arange(seq)[None], None, packed_seq_params=psp)
            masked_lm_loss(logits, labels, torch.ones(1, seq), 1e-5, tp_group)
    storages = {}
    for t in saved:
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            storages[st.data_ptr() or id(st)] = st.nbytes()
            if os.environ.get("MEMCHECK_DUMP"):
                print("SAVED", tuple(t.shape), t.dtype, st.nbytes(), flush=True)
    return sum(storages.values())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", default="te", choices=["te", "local"])
    ap.add_argument("--cases", nargs="*", default=list(CASES))
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel size (run under torchrun)")
    ap.add_argument("--sp", action="store_true", help="with --tp: sequence parallelism")
    args = ap.parse_args()
    conv_triton._conv4_fwd_kernel = _TorchConvKernel()
    if args.spec == "te":
        parts = specs._parts("local")
        specs._parts = lambda flavour: specs._Parts(
            parts.column, parts.row, TENormLike, FusedAttentionLike
        )
    state.initialize(state.ParallelLayout(tensor=args.tp, sequence_parallel=args.sp))
    layout = ["--tensor-model-parallel-size", str(args.tp)] + (["--sequence-parallel"] * args.sp)
    for name in args.cases:
        flags = layout + CASES[name]
        kept = kept_bytes(flags, args.tp)
        if torch.distributed.get_rank() == 0:  # TP ranks hold the same shapes
            print(json.dumps(dict(name=name, spec=args.spec, flags=flags, bytes=kept)), flush=True)
    state.destroy()


if __name__ == "__main__":
    main()
