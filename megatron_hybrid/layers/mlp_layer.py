"""The ``-`` sub-layer of the hybrid pattern: a SwiGLU MLP with its residual, pre- or post-norm.

Olmo Hybrid uses both placements in one model, decided by the mixer the MLP follows:
    after GDN (pre-norm):        out = h + MLP(RMSNorm(h))
    after attention (post-norm): out = h + RMSNorm(MLP(h))       (Olmo 3 "reordered" norm)
The stack sets ``norm_position`` once the layer pattern is known (see OlmoHybridStack).
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_hybrid import mcore
from megatron_hybrid.layers import recompute


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
        recompute_modules: frozenset = frozenset(),
        **_unused,
    ):
        super().__init__(config=config)
        self.layer_number = layer_number
        self.norm_position = "pre"
        self.norm = submodules.norm(
            config=config, hidden_size=config.hidden_size, eps=config.layernorm_epsilon
        )
        self.mlp = mcore.build_module(submodules.mlp, config=config, tp_group=pg_collection.tp)
        # selective recompute (Megatron's "mlp" and "layernorm" modules)
        self.recompute_mlp = "mlp" in recompute_modules
        self.recompute_norm = "layernorm" in recompute_modules

    def _mlp(self, x):
        out, bias = self.mlp(x)
        assert bias is None
        return out

    def forward(self, hidden_states, **_unused):
        on = recompute.active(self)
        mlp = self._mlp
        if self.recompute_mlp and on:

            def mlp(x):
                return recompute.checkpoint(self._mlp, x)

        if self.norm_position == "pre":
            if self.recompute_norm and on:
                # the norm output is saved by fc1 (or the MLP checkpoint): freed after the MLP,
                # rebuilt from a hook on the MLP output's gradient (megatron's pre-MLP norm)
                nr = recompute.NormRecompute()
                out = mlp(nr.norm(self.norm, hidden_states))
                nr.release(out)
            else:
                out = mlp(self.norm(hidden_states))
        else:
            out = mlp(hidden_states)
            if self.recompute_norm and on:
                out = recompute.checkpoint(self.norm, out)  # only the residual add follows
            else:
                out = self.norm(out)
        return hidden_states + out
