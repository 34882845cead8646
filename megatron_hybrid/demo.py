"""The embedded default: train a tiny Olmo-Hybrid on real text found on this machine.

    make demo        (= python -m megatron_hybrid.demo)

1. corpus: the running interpreter's standard-library sources (real text, no download);
2. a 4096-piece sentencepiece BPE tokenizer trained on it;
3. preprocessing into a megatron indexed dataset (tools/preprocess_data.py's code path);
4. the ``tiny`` preset trained with the real trainer (CPU or GPU), validation on held-out docs,
   a checkpoint in runs/demo/ckpt;
5. a short greedy sample from the trained model.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def greedy_sample(model, tokenizer, prompt: str, new_tokens: int, device) -> str:
    """Greedy continuation with the recurrent-state decoder (what tools/generate.py runs)."""
    import torch

    from megatron_hybrid.inference.decoder import HybridDecoder

    model.eval()
    decoder = HybridDecoder(model)
    state = decoder.new_state()
    ids = tokenizer.encode(prompt)
    logits = decoder.forward(torch.tensor([ids], device=device), state)[0, -1]
    for _ in range(new_tokens):
        nxt = int(logits[: tokenizer.vocab_size].argmax())
        if nxt == tokenizer.eod:
            break
        ids.append(nxt)
        logits = decoder.forward(torch.tensor([[nxt]], device=device), state)[0, -1]
    return tokenizer.decode(ids)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/demo", help="working directory")
    p.add_argument("--train-iters", type=int, default=150)
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--global-batch-size", type=int, default=8)
    p.add_argument("--micro-batch-size", type=int, default=None, help="default: half the batch")
    p.add_argument("--preset", default="tiny", help="model preset (GPU: e.g. olmo_hybrid_1b)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--vocab", type=int, default=4096, help="tokenizer pieces")
    a = p.parse_args(argv)

    from megatron_hybrid.data.demo_corpus import build_stdlib_corpus, tokenize_corpus
    from megatron_hybrid.data.tokenizer_training import train_sentencepiece

    os.makedirs(a.out, exist_ok=True)
    t0 = time.time()
    corpus = os.path.join(a.out, "stdlib.jsonl")
    info = build_stdlib_corpus(corpus)
    print(
        f"[demo] corpus: {info['documents']} files, {info['bytes'] / 1e6:.1f} MB from {info['root']}"
    )
    tok_model = train_sentencepiece([corpus], os.path.join(a.out, "tokenizer"), vocab_size=a.vocab)
    print(f"[demo] tokenizer: {tok_model}")
    summary = tokenize_corpus(corpus, os.path.join(a.out, "stdlib"), tok_model, max_workers=4)
    print(f"[demo] preprocessed: {summary.documents} documents, {summary.tokens:,} tokens")
    prefix = summary.outputs[0]

    from megatron_hybrid.parallel import state
    from megatron_hybrid.training.checkpoint import unwrap
    from megatron_hybrid.training.cli import parse
    from megatron_hybrid.training.loop import Trainer

    ckpt = os.path.join(a.out, "ckpt")
    run, _ = parse(
        [
            "--preset",
            a.preset,
            "--data-path",
            prefix,
            "--split",
            "98,2,0",
            "--tokenizer-type",
            "SentencePieceTokenizer",
            "--tokenizer-model",
            tok_model,
            "--seq-length",
            str(a.seq_length),
            "--global-batch-size",
            str(a.global_batch_size),
            "--micro-batch-size",
            str(a.micro_batch_size or max(1, a.global_batch_size // 2)),
            "--train-iters",
            str(a.train_iters),
            "--lr",
            str(a.lr),
            "--min-lr",
            str(a.lr / 10),
            "--lr-warmup-iters",
            str(max(1, a.train_iters // 15)),
            "--log-interval",
            "10",
            "--eval-interval",
            str(a.train_iters),
            "--eval-iters",
            "2",
            "--save",
            ckpt,
            "--data-cache-path",
            os.path.join(a.out, "index_cache"),
        ]
    )
    try:
        trainer = Trainer(run, log=lambda s: print(s, flush=True)).setup()
        trainer.train()
        text = greedy_sample(
            unwrap(trainer.chunks[0]),
            trainer.tokenizer,
            "    def __init__(self",
            40,
            trainer.device,
        )
    finally:
        state.destroy()
    print("[demo] greedy sample from the trained model (prompt '    def __init__(self'):")
    print("-" * 60)
    print(text)
    print("-" * 60)
    print(f"[demo] done in {time.time() - t0:.0f} s; checkpoint in {ckpt}")
    print(f"[demo] more: python tools/generate.py --load {ckpt} --prompt 'import os'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
