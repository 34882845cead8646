"""Selective activation recompute for the Olmo-Hybrid sub-layers (Megatron's
``--recompute-granularity selective --recompute-modules ...``).

Each layer is told at construction which of its parts to recompute (specs.py passes the module
set); the parts run through megatron-core's RNG-state-aware checkpoints:

- ``checkpoint(fn, *tensors)``: megatron's ``tensor_parallel.checkpoint`` (saves only the
  tensor inputs, reruns ``fn`` in the backward with the forward's CPU/CUDA/tracker RNG states).
  Used for ``core_attn``, ``gdn`` (conv + chunked delta rule), ``mlp`` and post-norms.
- :class:`CheckpointWithoutOutput`: megatron's variant that also frees the *output* storage once
  the consumer has saved it (a pre-norm's output is saved by the next linear), and restores it
  from a grad hook on the consumer's output before that linear's backward needs it. Used for
  the pre-norms (``layernorm``), as megatron's TransformerLayer does for its input layernorm.

Full granularity (whole layers) is megatron-core's own ``HybridStack`` path, set through the
TransformerConfig (see training/config.py ``RecomputeConfig``).
"""

from __future__ import annotations

import torch

from megatron_hybrid import mcore

# What each name recomputes (docs/training.md, "Activation recompute").
RECOMPUTE_MODULES = {
    "core_attn": "attention's softmax(QK^T)V core (not the QKV/output projections)",
    "gdn": "GDN's short convs + chunked delta-rule kernel, from the pre-conv projections",
    "mlp": "the whole SwiGLU MLP (fc1, activation, fc2)",
    "layernorm": "the block RMSNorms: pre-norms (GDN, MLP after GDN) and the Olmo 3 post-norms",
}


def active(module: torch.nn.Module) -> bool:
    """Recompute only where a backward will follow (training with autograd on)."""
    return module.training and torch.is_grad_enabled()


def checkpoint(fn, *tensors):
    """``fn(*tensors)`` whose intermediates are recomputed in the backward (megatron-core's
    checkpoint: RNG states restored; non-tensor arguments go in through ``fn``'s closure)."""
    return mcore.tensor_parallel.checkpoint(fn, False, *tensors)


class CheckpointWithoutOutput(mcore.CheckpointWithoutOutput):
    """megatron-core's ``CheckpointWithoutOutput`` with two things fixed for this stack:

    - no FP8 state is consulted (upstream's default reads Transformer Engine's FP8 state, a
      NameError where TE is absent, e.g. the local spec on CPU; FP8 training is refused here);
    - the recomputed output is copied back into the freed storage instead of upstream's
      JIT-compiled ``share_storage`` extension (a C++ build on first use; the copy touches only
      a norm output). The copy is at storage level, so no version counter changes, as upstream.
    """

    def __init__(self):
        super().__init__(fp8=None)

    def _recompute(self, _):
        if self.ctx is None:  # already recomputed
            return
        if not torch.autograd._is_checkpoint_valid():
            raise RuntimeError("Checkpointing is not compatible with .grad(); use .backward()")
        rng = mcore.tensor_parallel.random
        with rng._fork_rng():
            rng._set_all_rng_states(*self.rng_states)
            inputs = []
            for t in self.ctx.saved_tensors:
                if isinstance(t, torch.Tensor):
                    t = t.detach().requires_grad_(t.requires_grad)
                inputs.append(t)
            with torch.enable_grad():
                outputs = self.run_function(*inputs)
        if isinstance(outputs, torch.Tensor):
            outputs = (outputs,)
        for freed, fresh in zip(self.outputs, outputs):
            storage = fresh.untyped_storage()
            freed.untyped_storage().resize_(storage.nbytes())
            freed.untyped_storage().copy_(storage)
        self.ctx.outputs, self.ctx.inputs = outputs, tuple(inputs)
        self.run_function = self.rng_states = self.outputs = self.ctx = None


class NormRecompute:
    """``layernorm`` recompute of one pre-norm per forward: ``x = nr.norm(norm, h)``, then
    ``nr.release(consumer_output)`` once the consumer (which saved ``x``) has run."""

    def __init__(self):
        self._ckpt = None

    def norm(self, norm: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
        self._ckpt = CheckpointWithoutOutput()
        return self._ckpt.checkpoint(norm, h)

    def release(self, consumer_output: torch.Tensor) -> None:
        ckpt, self._ckpt = self._ckpt, None
        ckpt.discard_output_and_register_recompute(consumer_output)
