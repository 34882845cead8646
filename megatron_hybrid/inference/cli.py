"""tools/generate.py: generation and held-out perplexity from a training checkpoint.

    python tools/generate.py --load runs/demo/ckpt --prompt "def main(" --max-new-tokens 64
    python tools/generate.py --load CKPT --prompt-ids 5,9,14 --greedy --max-new-tokens 16
    python tools/generate.py --load CKPT --prompt "..." --temperature 0.8 --top-p 0.95
    python tools/generate.py --load CKPT --eval-file heldout.jsonl

The checkpoint may have been saved at any TP/PP/CP layout; it is loaded into one process (GPU
when there is one, else CPU). Each generation prints its text and, last, a line
``GENERATED ids=<comma-separated new token ids>``; evaluation prints a line
``EVAL documents=N tokens=T loss=L perplexity=P``. Bad input: one ``error: ...`` line, exit 2.

An entry point: it stands on the top floor with tools/ (docs/architecture.md), above
conversion/, whose ``load_session`` reads the checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys

from megatron_hybrid.conversion.saved_checkpoints import load_session
from megatron_hybrid.inference.sampling import SamplingConfig
from megatron_hybrid.inference.session import GenerateError


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="generate.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--load", required=True, help="checkpoint root (its tracker) or an iter_N dir")
    p.add_argument("--iteration", type=int, default=None)
    src = p.add_argument_group("input (one or more prompts, and/or --eval-file)")
    src.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable)")
    src.add_argument(
        "--prompt-ids", action="append", default=[], help="comma-separated token ids (repeatable)"
    )
    src.add_argument(
        "--eval-file",
        help="held-out data: a preprocess_data.py prefix (.bin/.idx), .jsonl (one document per "
        "line) or a plain text file (one document)",
    )
    src.add_argument("--json-key", default="text", help="document field of --eval-file jsonl")
    src.add_argument(
        "--eval-window", type=int, default=2048, help="tokens per forward chunk (state carried)"
    )
    src.add_argument("--eval-max-docs", type=int, default=None)
    tok = p.add_argument_group("tokenizer (default: the one recorded in the checkpoint)")
    tok.add_argument("--tokenizer-type", default=None)
    tok.add_argument("--tokenizer-model", default=None)
    gen = p.add_argument_group("decoding")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--greedy", action="store_true", help="arg-max decoding (the default)")
    gen.add_argument("--temperature", type=float, default=None, help="sample at this temperature")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=1234)
    gen.add_argument("--ignore-eos", action="store_true", help="do not stop at end-of-document")
    run = p.add_argument_group("runtime")
    run.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    run.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto")
    run.add_argument("--no-progress", action="store_true")
    run.add_argument(
        "--no-verify-checkpoint-checksums",
        action="store_true",
        help="do not re-hash the checkpoint's files against its checksums.sha256 (very large ones)",
    )
    args = p.parse_args(argv)
    sampling_asked = args.temperature is not None or args.top_p < 1 or args.top_k > 0
    if args.greedy and sampling_asked:
        p.error("--greedy cannot be combined with --temperature/--top-p/--top-k")
    args.sampling = SamplingConfig(
        greedy=not sampling_asked,
        temperature=args.temperature if args.temperature is not None else 1.0,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )
    if not (args.prompt or args.prompt_ids or args.eval_file):
        p.error("give --prompt, --prompt-ids or --eval-file")
    if args.max_new_tokens < 0 or args.eval_window < 1:
        p.error("--max-new-tokens must be >= 0 and --eval-window >= 1")
    return args


def _prepare_device(choice: str) -> None:
    """Pick the device before anything initialises CUDA (build_model follows availability)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise GenerateError("generate.py runs in one process: start it without torchrun/srun")
    if choice == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    elif choice == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise GenerateError("--device cuda: no GPU is visible")


def _parse_ids(text: str, vocab: int) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise GenerateError(f"--prompt-ids {text!r}: expected comma-separated integers") from None
    if not ids:
        raise GenerateError("--prompt-ids is empty")
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise GenerateError(f"--prompt-ids: {bad[:5]} outside the model's vocabulary [0, {vocab})")
    return ids


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        _prepare_device(args.device)
        session = load_session(
            args.load,
            args.iteration,
            args.dtype,
            args.tokenizer_type,
            args.tokenizer_model,
            verify=not args.no_verify_checkpoint_checksums,
        )
        n_params = sum(p.numel() for p in session.model.parameters())
        print(f"loaded {session.where}: {n_params:,} parameters", flush=True)
        prompts = [(text, session.encode(text)) for text in args.prompt]
        prompts += [(None, _parse_ids(t, session.vocab_size)) for t in args.prompt_ids]
        for text, ids in prompts:
            warning = session.length_warning(len(ids), args.max_new_tokens)
            if warning:
                print(warning, file=sys.stderr, flush=True)
            session.generate_and_print(
                ids, text, args.max_new_tokens, args.sampling, stop_at_eos=not args.ignore_eos
            )
        if args.eval_file:
            session.evaluate_and_print(
                args.eval_file, args.json_key, args.eval_window, args.eval_max_docs,
                progress=not args.no_progress,
            )  # fmt: skip
    except (GenerateError, ValueError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        from megatron_hybrid.parallel import state

        state.destroy()
    return 0
