"""``megatron-hybrid-train`` / ``python -m megatron_hybrid.train``: the pretraining entry point.

Run under torchrun (``torchrun --nproc-per-node 8 -m megatron_hybrid.train ...``) or srun; a
plain ``python -m megatron_hybrid.train`` is one rank. ``--help`` lists the flags.
"""

from __future__ import annotations

import os
import sys


def main(argv=None) -> int:
    from megatron_hybrid.models.olmo_hybrid.config import ConfigError
    from megatron_hybrid.training.checkpoint import CheckpointError
    from megatron_hybrid.training.cli import parse

    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    try:
        run, args = parse(argv)
        world = args.world_size or int(
            os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1"))
        )
        if rank == 0:
            from megatron_hybrid.training.config import config_warnings

            for warning in config_warnings(run):
                print(warning, file=sys.stderr, flush=True)
        if args.dry_run:
            from megatron_hybrid.training.preflight import preflight
            from megatron_hybrid.training.report import describe

            preflight(run, world)  # every check of the real run that needs no data
            if rank == 0:
                print(describe(run, world, show_config=True))
            return 0
        from megatron_hybrid.training.loop import Trainer, TrainingStopped

        trainer = Trainer(run, log=lambda s: print(s, flush=True)).setup()
        trainer.train()
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except Exception as e:  # noqa: BLE001
        from megatron_hybrid.training.loop import TrainingStopped

        if isinstance(e, TrainingStopped):
            print(f"error: {e}", file=sys.stderr, flush=True)
            return 3
        raise
    finally:
        from megatron_hybrid.parallel import state

        state.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
