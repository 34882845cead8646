"""megatron_hybrid: Megatron-style 3D-parallel pretraining for hybrid GDN/attention language models.

Floors (imports run downward only; docs/architecture.md, checked by tests/test_import_floors.py):
    tools/*.py, train.py, demo.py, inference/cli.py   entry points: command lines
    megatron_hybrid.conversion           HF export/import + validation, checkpoint loading, parity
    megatron_hybrid.training | .inference  run config, loop, checkpoints | decoder, generation
    megatron_hybrid.models.olmo_hybrid   config + presets, layer specs, model builder, HF mapping
    megatron_hybrid.layers               GDN mixer, Olmo attention, norms, MLP layer
    megatron_hybrid.parallel | .data     process groups, CPU shim, TP/CP | tokenizers, batches
    megatron_hybrid.mcore                the one place that imports megatron-core internals
    megatron_hybrid.kernels              GDN ops (our Triton kernels, PyTorch references)
    megatron_hybrid.errors               ConfigError
"""

__version__ = "0.1.0"


def _source_checkout_kernels() -> None:
    """``pip install`` maps the top-level kernels/ folder to megatron_hybrid.kernels. When the
    repository is used straight from a checkout on PYTHONPATH (common in containers), load that
    folder under the same name so imports work identically."""
    import importlib.util
    import os
    import sys

    if "megatron_hybrid.kernels" in sys.modules:
        return
    here = os.path.dirname(os.path.abspath(__file__))
    if os.path.isfile(os.path.join(here, "kernels", "__init__.py")):
        return  # a regular installed layout
    src = os.path.join(os.path.dirname(here), "kernels")
    if (
        os.path.isfile(os.path.join(src, "__init__.py"))
        and importlib.util.find_spec("megatron_hybrid.kernels") is None
    ):
        spec = importlib.util.spec_from_file_location(
            "megatron_hybrid.kernels",
            os.path.join(src, "__init__.py"),
            submodule_search_locations=[src],
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules["megatron_hybrid.kernels"] = module
        spec.loader.exec_module(module)


_source_checkout_kernels()
