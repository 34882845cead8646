"""Checks of a RunConfig that need neither data nor process groups: what ``--dry-run`` runs, so
a dry run accepts exactly the layouts and options the real run accepts (data aside)."""

from __future__ import annotations

from megatron_hybrid.models.olmo_hybrid.config import ConfigError
from megatron_hybrid.training.config import check_schedule


def preflight(run, world_size: int) -> None:
    """Raise ConfigError (or the ValueError of a tokenizer) for anything Trainer.setup or the
    model build would refuse before reading data. Resolves the tokenizer's padded vocabulary
    into ``run.model`` as the real run does, so the report shows the model that would train."""
    from megatron_hybrid.parallel.context import check_run_config
    from megatron_hybrid.training.loop import resolve_vocab
    from megatron_hybrid.training.model_setup import layer_pattern, transformer_config

    run.validate(world_size, require_data=False)
    check_run_config(run, dry_run=True)
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
