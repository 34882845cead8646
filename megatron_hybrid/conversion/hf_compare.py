"""Logit (and gradient) parity of our megatron-core model against transformers' olmo_hybrid.

Used by ``tools/compare_hf.py`` and by conversion validation. Runs under torchrun for TP > 1
(gloo on CPU). The reference is HF's ``OlmoHybridForCausalLM``: random init from a seed
(``--hf-config``; norm weights are perturbed away from 1 so a mis-mapped norm cannot hide) or
weights from a directory (``--hf-model``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass

import torch

from megatron_hybrid.models.olmo_hybrid.config import ConfigError
from megatron_hybrid.models.olmo_hybrid.hf_mapping import (
    config_from_hf,
    hf_to_megatron,
    shard_for_rank,
    split_fused_conv,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class ParityResult:
    max_abs_diff: float
    mean_abs_diff: float
    cosine: float
    top1_agreement: float
    logits_ok: bool
    grad_max_rel_err: float | None = None
    grad_worst_param: str | None = None
    grads_ok: bool | None = None
    spec: str = "local"
    device: str = "cpu"

    @property
    def ok(self) -> bool:
        return self.logits_ok and self.grads_ok is not False


def build_hf_model(args, hf_cfg_dict):
    from transformers import OlmoHybridConfig as HFConfig
    from transformers import OlmoHybridForCausalLM

    dtype = DTYPES[args.dtype]
    if args.hf_model:
        return OlmoHybridForCausalLM.from_pretrained(args.hf_model, dtype=dtype).eval()
    cfg_fields = {k: v for k, v in hf_cfg_dict.items() if k not in ("architectures", "model_type")}
    torch.manual_seed(args.seed)
    model = OlmoHybridForCausalLM(HFConfig(**cfg_fields)).to(dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and name.endswith("weight"):  # norms init to exactly 1
                p.mul_(1 + 0.2 * torch.randn_like(p))
    return model


def _load_hf_config(args) -> dict:
    path = args.hf_config or os.path.join(args.hf_model, "config.json")
    if not os.path.exists(path):
        raise ConfigError(f"no HF config at {path}")
    with open(path) as f:
        return json.load(f)


def run_parity(args) -> ParityResult:
    """Build both models, compare; returns the numbers (rank 0's view, all ranks agree)."""
    from megatron_hybrid import mcore
    from megatron_hybrid.models.olmo_hybrid.model import build_model
    from megatron_hybrid.parallel import state

    hf_cfg = _load_hf_config(args)
    cfg = config_from_hf(hf_cfg, vocab_multiple=args.tp)
    cfg.check_parallel(args.tp)  # before any process group or model exists
    cfg = cfg.replace(gdn_backend=args.gdn_backend)

    state.initialize(state.ParallelLayout(tensor=args.tp, sequence_parallel=args.sequence_parallel))
    world = torch.distributed.get_world_size()
    if world != args.tp:
        raise ConfigError(f"run with exactly --tp ranks: world size {world} != --tp {args.tp}")
    tp_rank = mcore.parallel_state.get_tensor_model_parallel_rank()

    hf = build_hf_model(args, hf_cfg)
    dtype = DTYPES[args.dtype]
    tcfg = cfg.transformer_config(
        tensor_parallel=args.tp, sequence_parallel=args.sequence_parallel, params_dtype=dtype
    )
    from megatron_hybrid.models.olmo_hybrid.model import default_flavour

    flavour = default_flavour() if args.spec == "auto" else args.spec
    ours = build_model(cfg, tcfg, parallel_output=False, flavour=flavour)
    full = hf_to_megatron(split_fused_conv(hf.state_dict(), cfg), cfg)
    local = shard_for_rank(full, ours, tp_rank, args.tp)
    missing, unexpected = ours.load_state_dict(local, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise KeyError(f"state dict mismatch: missing {missing[:3]} unexpected {unexpected[:3]}")

    ids = random_batch(hf.config, args.batch, args.seq_len, args.seed)
    labels = torch.roll(ids, -1, dims=1)
    device = next(ours.parameters()).device
    pos = torch.arange(args.seq_len)[None].expand(args.batch, -1)

    ours.train(args.grads)
    res = compare_logits(ours, hf, ids, args.dtype)
    res.spec = flavour
    hf_vocab = hf.config.vocab_size

    if args.grads:
        _compare_grads(
            args,
            cfg,
            ours,
            hf,
            our_logits_fn=lambda: ours(ids.to(device), pos.to(device), None),
            hf_vocab=hf_vocab,
            ids=ids,
            labels=labels,
            res=res,
            tp_rank=tp_rank,
        )
    return res


def random_batch(hf_config, batch: int, seq_len: int, seed: int) -> torch.Tensor:
    """The fixed random token batch of a parity check (seeded by ``seed + 1``), pad token excluded.

    HF gives the pad row padding_idx semantics (zero init, never a gradient); our pretraining
    embedding has none, so the pad token is kept out of the batch.
    """
    g = torch.Generator().manual_seed(seed + 1)
    hf_vocab = hf_config.vocab_size
    ids = torch.randint(0, hf_vocab, (batch, seq_len), generator=g)
    pad = hf_config.pad_token_id
    if pad is not None and 0 <= pad < hf_vocab:
        ids = torch.randint(0, hf_vocab - 1, (batch, seq_len), generator=g)
        ids = ids + (ids >= pad).long()
    return ids


def compare_logits(ours, hf, ids: torch.Tensor, dtype: str = "fp32") -> ParityResult:
    """Run our model (TP rank's view, full logits: ``parallel_output=False`` or TP=1) and the HF
    model on ``ids``; logits over the HF vocabulary (our padded rows dropped) are compared.

    fp32: ``assert_close(rtol=1e-4, atol=1e-4)``; bf16: cosine >= 0.99 everywhere and >= 90%
    next-token agreement.
    """
    device = next(ours.parameters()).device
    batch, seq_len = ids.shape
    hf_vocab = hf.config.vocab_size
    pos = torch.arange(seq_len)[None].expand(batch, -1)
    our_logits = ours(ids.to(device), pos.to(device), None)[..., :hf_vocab].float().cpu()
    hf_logits = hf(input_ids=ids).logits.float()

    diff = (our_logits - hf_logits).abs()
    cos = torch.nn.functional.cosine_similarity(
        our_logits.flatten(0, 1), hf_logits.flatten(0, 1), dim=-1
    )
    agree = (our_logits.argmax(-1) == hf_logits.argmax(-1)).float().mean().item()
    if dtype == "fp32":
        try:
            torch.testing.assert_close(our_logits, hf_logits, rtol=1e-4, atol=1e-4)
            logits_ok = True
        except AssertionError:
            logits_ok = False
    else:
        logits_ok = cos.min().item() >= 0.99 and agree >= 0.9
    return ParityResult(
        diff.max().item(),
        diff.mean().item(),
        cos.mean().item(),
        agree,
        logits_ok,
        device=str(device),
    )


def _compare_grads(args, cfg, ours, hf, our_logits_fn, hf_vocab, ids, labels, res, tp_rank):
    """Backprop the same loss through both models; compare every parameter's gradient."""
    from megatron_hybrid import mcore

    def loss_of(logits):
        return torch.nn.functional.cross_entropy(
            logits[..., :hf_vocab].float().flatten(0, 1), labels.flatten().to(logits.device)
        )

    hf.zero_grad()
    loss_of(hf(input_ids=ids).logits).backward()
    ours.zero_grad()
    loss_of(our_logits_fn()).backward()
    # What megatron's finalize_model_grads does for sequence-parallel norms: their gradients
    # are partial sums over this rank's tokens.
    tp_group = mcore.parallel_state.get_tensor_model_parallel_group()
    for p in ours.parameters():
        if args.sequence_parallel and getattr(p, "sequence_parallel", False):
            torch.distributed.all_reduce(p.grad, group=tp_group)
    hf_grads = {n: p.grad for n, p in hf.named_parameters()}
    cfg_grads = hf_to_megatron(split_fused_conv(hf_grads, cfg), cfg)
    ref = shard_for_rank(cfg_grads, ours, tp_rank, args.tp)
    worst, worst_name = 0.0, None
    for name, p in ours.named_parameters():
        r = ref[name].float()
        err = ((p.grad.float().cpu() - r).norm() / r.norm().clamp_min(1e-12)).item()
        if err > worst:
            worst, worst_name = err, name
    t = torch.tensor([worst], device=next(ours.parameters()).device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    res.grad_max_rel_err, res.grad_worst_param = t.item(), worst_name
    res.grads_ok = t.item() < (1e-4 if args.dtype == "fp32" else 5e-2)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf-config", help="HF olmo_hybrid config.json: random init from --seed")
    src.add_argument("--hf-model", help="HF olmo_hybrid model directory (weights are loaded)")
    p.add_argument(
        "--tp", type=int, default=1, help="tensor-parallel size (= ranks under torchrun)"
    )
    p.add_argument("--sequence-parallel", action="store_true", help="shard norms over TP (TP>1)")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument(
        "--grads",
        action="store_true",
        help="also backprop a next-token loss and compare every parameter's gradient",
    )
    p.add_argument(
        "--spec",
        choices=["auto", "local", "te"],
        default="auto",
        help="layer-spec flavour of our model (auto: te on a GPU with TE, else local)",
    )
    p.add_argument("--gdn-backend", default="auto", help="GDN recurrence backend (auto|torch|...)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    try:
        res = run_parity(args)
    except (ConfigError, KeyError, ValueError) as e:
        if rank == 0:
            msg = e.args[0] if e.args else str(e)
            print(f"error: {msg}", file=sys.stderr)
            print(f"PARITY FAIL ({type(e).__name__})")
        return 2
    if rank == 0:
        print(
            f"logits: max |diff| {res.max_abs_diff:.3e}  mean |diff| {res.mean_abs_diff:.3e}  "
            f"cosine {res.cosine:.6f}  next-token agreement {res.top1_agreement:.4f}"
        )
        if res.grads_ok is not None:
            print(f"grads: max relative error {res.grad_max_rel_err:.3e} ({res.grad_worst_param})")
        verdict = "PARITY OK" if res.ok else "PARITY FAIL"
        print(
            f"{verdict} tp={args.tp} dtype={args.dtype} seq={args.seq_len} batch={args.batch} "
            f"spec={res.spec} device={res.device}"
        )
    from megatron_hybrid.parallel import state

    state.destroy()
    return 0 if res.ok else 1
