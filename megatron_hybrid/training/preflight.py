"""Checks of a RunConfig that need neither data nor process groups: what ``--dry-run`` runs, so
a dry run accepts exactly the layouts and options the real run accepts (data aside)."""

from __future__ import annotations

from megatron_hybrid import mcore
from megatron_hybrid.models.olmo_hybrid.config import ConfigError
from megatron_hybrid.parallel.context import check_layout
from megatron_hybrid.training.config import FP8_NEEDS_TE, check_schedule, fp8_recipe


def preflight(run, world_size: int) -> None:
    """Raise ConfigError (or the ValueError of a tokenizer) for anything Trainer.setup or the
    model build would refuse before reading data. Resolves the tokenizer's padded vocabulary
    into ``run.model`` as the real run does, so the report shows the model that would train."""
    from megatron_hybrid.training.loop import resolve_vocab
    from megatron_hybrid.training.model_setup import layer_pattern, transformer_config

    run.validate(world_size, require_data=False)
    check_context_parallel(run, dry_run=True)
    check_fp8_environment(run, dry_run=True)
    check_schedule(run)
    _, vocab, _ = resolve_vocab(run, run.parallel.tensor)
    if vocab != run.model.vocab_size:
        run.model = run.model.replace(vocab_size=vocab)
    layer_pattern(run)  # pipeline segments ('|' or an even split of the blocks)
    if run.train.spec not in ("auto", "te", "local"):
        raise ConfigError(f"--spec {run.train.spec!r}: use auto, te or local")
    try:
        transformer_config(run)  # megatron's own TransformerConfig checks
    except (AssertionError, ValueError) as e:
        raise ConfigError(f"megatron-core rejects this layout/model: {e}") from None


def check_context_parallel(run, dry_run: bool = False) -> None:
    """Reject a RunConfig whose CP layout the model cannot run (before any process group or
    model exists): the row split (``parallel.context.check_layout``) and, for the te spec, a
    usable Transformer Engine (not for ``--dry-run``, which plans GPU jobs on hosts without
    it). Lives here, above the model, because it resolves the layer spec."""
    from megatron_hybrid.models.olmo_hybrid.model import default_flavour

    p, t = run.parallel, run.train
    if p.context <= 1:
        return
    check_layout(
        t.micro_batch_size * run.data.seq_length,
        p.context,
        p.tensor,
        p.sequence_parallel,
        run.model.gdn_conv_kernel,
        micro_batch_size=t.micro_batch_size,
        seq_length=run.data.seq_length,
    )
    flavour = default_flavour() if t.spec == "auto" else t.spec
    if flavour == "te" and not dry_run:
        # the te spec runs CP attention too (layers/te_cp_attention.py), but needs TE itself:
        # say so now rather than after the process groups are up
        try:
            mcore.te_modules()
        except (ImportError, RuntimeError) as e:
            raise ConfigError(
                f"context parallel size {p.context} with the 'te' layer spec: Transformer Engine "
                f"is not usable here ({e}); without it CP needs the local layer spec (--spec local)"
            ) from e


def check_fp8_environment(run, dry_run: bool = False) -> None:
    """What ``--fp8-format`` needs of this machine, before any process group or model exists:
    the te layer spec with Transformer Engine on a CUDA device, and a GPU on which TE runs the
    chosen recipe (TE's own ``check_*_support``; MXFP8 needs compute capability 10.x, so it is
    refused on Hopper). ``--dry-run`` plans GPU jobs on hosts without either: it skips these."""
    from megatron_hybrid.models.olmo_hybrid.model import default_flavour

    recipe = fp8_recipe(run)
    if recipe is None or dry_run:
        return
    import torch

    t = run.train
    flavour = default_flavour() if t.spec == "auto" else t.spec
    if flavour != "te" or not torch.cuda.is_available():
        where = "no CUDA device" if not torch.cuda.is_available() else f"layer spec {flavour}"
        raise ConfigError(f"--fp8-format {t.fp8_format}: {FP8_NEEDS_TE} ({where})")
    try:
        mcore.te_modules()
    except (ImportError, RuntimeError) as e:
        raise ConfigError(f"--fp8-format {t.fp8_format}: {FP8_NEEDS_TE} ({e})") from None
    ok, reason = mcore.fp8_recipe_support(recipe)
    if not ok:
        major, minor = torch.cuda.get_device_capability()
        hint = (
            " MXFP8 needs Blackwell (compute capability 10.x); on Hopper use delayed, "
            "tensorwise or blockwise."
            if recipe == "mxfp8"
            else ""
        )
        raise ConfigError(
            f"--fp8-recipe {recipe} ({mcore.FP8_RECIPE_CLASSES[recipe]}) is not supported on "
            f"this GPU ({torch.cuda.get_device_name()}, compute capability {major}.{minor}): "
            f"{reason}.{hint}"
        )
