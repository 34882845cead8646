"""The command lines of the conversion tools: tools/convert_to_hf.py (``main_to_hf``) and
tools/convert_from_hf.py (``main_from_hf``). Both run in one process on CPU; bad input is one
``error: ...`` line (exit 2), a failed validation exit 1.
"""

from __future__ import annotations

import os
import sys

from megatron_hybrid.conversion.hf_export import export_to_hf
from megatron_hybrid.conversion.hf_import import import_from_hf
from megatron_hybrid.conversion.saved_checkpoints import ConversionError
from megatron_hybrid.models.olmo_hybrid.config import ConfigError


def format_error(e: BaseException) -> str:
    """One line for ``error: ...`` (KeyError's repr quotes are dropped)."""
    msg = e.args[0] if e.args else str(e)
    return str(msg).splitlines()[0] if str(msg) else type(e).__name__


ERRORS = (ConversionError, ConfigError, KeyError, ValueError, FileNotFoundError)


# ---------------------------------------------------------------------------------------------
# command lines (tools/convert_to_hf.py, tools/convert_from_hf.py)


def _cpu_single_process(prog: str) -> None:
    """Conversion runs in one process on CPU (fp32 validation against transformers on CPU)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConversionError(f"{prog} runs in one process: start it without torchrun/srun")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    # transformers' olmo_hybrid binds fla's Triton GDN kernels at import time whenever fla is
    # importable, whatever the device; here everything runs on CPU, where they cannot ("0 active
    # drivers": seen on the H100 with fla installed). A None entry makes ``import fla`` fail, so
    # transformers takes its PyTorch path. Our own model never uses fla.
    if "transformers.models.olmo_hybrid.modeling_olmo_hybrid" not in sys.modules:
        sys.modules.setdefault("fla", None)


def _shard_bytes(text: str) -> int:
    units = {"KB": 1000, "MB": 1000**2, "GB": 1000**3, "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3}
    t = text.strip().upper()
    for u in sorted(units, key=len, reverse=True):
        if t.endswith(u):
            return int(float(t[: -len(u)]) * units[u])
    return int(t)


def parse_to_hf_args(argv=None):
    import argparse

    p = argparse.ArgumentParser(
        prog="convert_to_hf.py",
        description="Export a megatron-hybrid checkpoint (saved at any TP/PP/VP layout) to a "
        "transformers olmo_hybrid directory, then check its logits against ours.",
    )
    p.add_argument("--load", required=True, help="checkpoint root (with its tracker) or iter_N dir")
    p.add_argument("--iteration", type=int, default=None, help="default: the tracker's latest")
    p.add_argument("--save", required=True, help="HF output directory (new or empty)")
    p.add_argument(
        "--tokenizer-model",
        default=None,
        help="sentencepiece .model (copied, plus a converted tokenizer.json) or HF tokenizer dir",
    )
    p.add_argument(
        "--dtype",
        choices=["auto", "bf16", "fp32"],
        default="auto",
        help="weights dtype in the export (auto: as the checkpoint stores them)",
    )
    p.add_argument(
        "--hf-vocab-size",
        default=None,
        help="keep only this many vocabulary rows (a number, or 'tokenizer' for the tokenizer's "
        "size); default: all rows of the checkpoint, padding included (as Olmo releases do)",
    )
    p.add_argument("--max-shard-size", default="5GB", help="per safetensors file (default 5GB)")
    p.add_argument("--skip-validation", action="store_true", help="do not load it back and compare")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--no-verify-checkpoint-checksums",
        action="store_true",
        help="do not re-hash the checkpoint's files against its checksums.sha256 (very large ones)",
    )
    return p.parse_args(argv)


def main_to_hf(argv=None) -> int:
    import sys

    args = parse_to_hf_args(argv)
    try:
        _cpu_single_process("convert_to_hf.py")
        res = export_to_hf(
            args.load,
            args.save,
            iteration=args.iteration,
            dtype=args.dtype,
            tokenizer_model=args.tokenizer_model,
            hf_vocab_size=args.hf_vocab_size,
            validate=not args.skip_validation,
            max_shard_bytes=_shard_bytes(args.max_shard_size),
            progress=not args.no_progress,
            log=lambda s: print(s, flush=True),
            verify=not args.no_verify_checkpoint_checksums,
        )
    except ERRORS as e:
        print(f"error: {format_error(e)}", file=sys.stderr, flush=True)
        return 2
    finally:
        _destroy()
    if res.parity is None:
        print("validation skipped (--skip-validation)")
        return 0
    r = res.parity
    print(
        f"validation vs transformers (fp32, CPU): max |diff| {r.max_abs_diff:.3e}  mean |diff| "
        f"{r.mean_abs_diff:.3e}  cosine {r.cosine:.6f}  next-token agreement "
        f"{r.top1_agreement:.4f}"
    )
    g = res.greedy
    tie = f" (then a near-tie at step {g.tie_at + 1}, accepted)" if g.tie_at is not None else ""
    print(
        f"greedy generation ({g.prompt_tokens}-token prompt): {g.equal}/{g.new_tokens} new "
        f"tokens equal to transformers' generate(){tie}"
    )
    if r.logits_ok and g.ok:
        print(
            f"VALIDATION OK: {args.save} loads with AutoModelForCausalLM; logits match "
            "(assert_close 1e-4) and greedy generation matches"
        )
        return 0
    why = [] if r.logits_ok else ["logits differ beyond assert_close(rtol=1e-4, atol=1e-4)"]
    why += [] if g.ok else ["greedy generation differs"]
    print(f"VALIDATION FAIL: {'; '.join(why)}")
    return 1


def parse_from_hf_args(argv=None):
    import argparse

    p = argparse.ArgumentParser(
        prog="convert_from_hf.py",
        description="Import a transformers olmo_hybrid directory as a weights-only "
        "megatron-hybrid checkpoint that megatron-hybrid-train --load continues from.",
    )
    p.add_argument("--hf-model", required=True, help="HF directory (config.json + safetensors)")
    p.add_argument("--save", required=True, help="checkpoint root to write (<save>/iter_0000000)")
    p.add_argument(
        "--tensor-model-parallel-size",
        type=int,
        default=1,
        help="check the model splits at this TP (and pad the vocabulary to a multiple of it); "
        "the checkpoint itself loads at any layout",
    )
    p.add_argument(
        "--pipeline-model-parallel-size",
        type=int,
        default=1,
        help="check the blocks split evenly into this many pipeline stages",
    )
    return p.parse_args(argv)


def main_from_hf(argv=None) -> int:
    import sys

    args = parse_from_hf_args(argv)
    try:
        _cpu_single_process("convert_from_hf.py")
        res = import_from_hf(
            args.hf_model,
            args.save,
            tensor_parallel=args.tensor_model_parallel_size,
            pipeline_parallel=args.pipeline_model_parallel_size,
            log=lambda s: print(s, flush=True),
        )
    except ERRORS as e:
        print(f"error: {format_error(e)}", file=sys.stderr, flush=True)
        return 2
    finally:
        _destroy()
    print(
        f"continue pretraining with: megatron-hybrid-train --config {res.checkpoint}/"
        f"run_config.json --load {args.save} --save DIR ... (weights only: fresh optimizer, "
        "schedule from iteration 0)"
    )
    return 0


def _destroy() -> None:
    from megatron_hybrid.parallel import state

    state.destroy()
