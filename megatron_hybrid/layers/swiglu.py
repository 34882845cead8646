"""The MLP's SwiGLU as megatron-core's activation *module* (``MLPSubmodules.activation_func``).

megatron-core's MLP applies ``submodules.activation_func(config=...)`` to the whole fc1 output
``[s, b, 2F/tp]`` when ``config.use_te_activation_func`` is set (the hook meant for Transformer
Engine's activation ops); our config sets it and the layer specs put :class:`SwiGLU` there, so
the MLP runs our fused kernel (kernels/swiglu.py) instead of megatron's ``torch.compile``-fused
``bias_swiglu_impl`` (eager, i.e. ~6 unfused kernels each way, under TORCHDYNAMO_DISABLE=1).

Tensor parallelism: megatron's fc1 is column parallel with ``stride=2`` for gated units; every
rank holds ``[gate_r; up_r]`` (parallel/sharding.py, megatron's ``apply_swiglu_sharded_factory``),
so its local output is ``[gate_r | linear_r]`` and the activation is rank-local.

The module has no parameters or buffers: it adds no state-dict or checkpoint key.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_hybrid.kernels.swiglu import swiglu


class SwiGLU(torch.nn.Module):
    """``silu(x[..., :F]) * x[..., F:]`` on the fc1 output (``backend`` as kernels.swiglu)."""

    def __init__(self, config=None, backend: str = "auto"):
        super().__init__()
        if config is not None:
            # what this module computes; anything else would be silently ignored by it
            bad = []
            if not config.gated_linear_unit:
                bad.append("gated_linear_unit=False")
            if config.activation_func is not F.silu:
                bad.append(f"activation_func={config.activation_func}")
            if config.glu_linear_offset != 0.0:
                bad.append(f"glu_linear_offset={config.glu_linear_offset}")
            if config.activation_func_clamp_value is not None:
                bad.append(f"activation_func_clamp_value={config.activation_func_clamp_value}")
            if config.activation_func_fp8_input_store:
                bad.append("activation_func_fp8_input_store=True")
            if bad:
                raise ValueError(f"SwiGLU activation module does not support {', '.join(bad)}")
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu(x, backend=self.backend)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"
