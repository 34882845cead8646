"""The ``-`` sub-layer of the hybrid pattern: a SwiGLU MLP with its residual, pre- or post-norm.

Olmo Hybrid uses both placements in one model, decided by the mixer the MLP follows:
    after GDN (pre-norm):        out = h + MLP(RMSNorm(h))
    after attention (post-norm): out = h + RMSNorm(MLP(h))       (Olmo 3 "reordered" norm)
The stack sets ``norm_position`` once the layer pattern is known (see OlmoHybridStack).
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_hybrid import mcore


@dataclass
class OlmoMLPLayerSubmodules:
    norm: type = None
    mlp: mcore.ModuleSpec = None


class OlmoMLPLayer(mcore.MegatronModule):
    def __init__(
        self,
        config,
        submodules: OlmoMLPLayerSubmodules,
        layer_number: int = 1,
        pg_collection=None,
        **_unused,
    ):
        super().__init__(config=config)
        self.layer_number = layer_number
        self.norm_position = "pre"
        self.norm = submodules.norm(
            config=config, hidden_size=config.hidden_size, eps=config.layernorm_epsilon
        )
        self.mlp = mcore.build_module(submodules.mlp, config=config, tp_group=pg_collection.tp)

    def forward(self, hidden_states, **_unused):
        if self.norm_position == "pre":
            out, bias = self.mlp(self.norm(hidden_states))
        else:
            out, bias = self.mlp(hidden_states)
            out = self.norm(out)
        assert bias is None
        return hidden_states + out
