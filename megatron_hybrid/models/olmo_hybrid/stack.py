"""megatron-core's HybridStack with what Olmo Hybrid needs on top.

Upstream's stack hard-codes a Transformer Engine final norm (so it cannot run on CPU) and knows
one MLP flavour. Here the final norm comes from the spec, and each ``-`` (MLP) sub-layer learns
whether it follows attention (post-norm, Olmo 3) or GDN (pre-norm). Layer construction, forward,
recompute, FP8 contexts and checkpoint sharding stay upstream's.
"""

from __future__ import annotations

from megatron_hybrid import mcore

GDN, ATTENTION, MLP, PIPE = "G", "*", "-", "|"


class OlmoHybridStack(mcore.HybridStack):
    def __init__(
        self, config, submodules, *, final_norm=None, post_layer_norm: bool = True, **kwargs
    ):
        super().__init__(config, submodules, post_layer_norm=False, **kwargs)
        for i, (symbol, layer) in enumerate(zip(self.layer_type_list, self.layers)):
            if symbol != MLP:
                continue
            prev = self.layer_type_list[i - 1] if i > 0 else None
            if prev not in (GDN, ATTENTION):
                raise ValueError(
                    f"layer {layer.layer_number}: an MLP ('-') must directly follow a mixer "
                    f"('G' or '*') in the same pipeline segment; found {prev!r} before it"
                )
            layer.norm_position = "post" if prev == ATTENTION else "pre"
        self.post_layer_norm = post_layer_norm
        if self.post_process and post_layer_norm:
            self.final_norm = final_norm(
                config=config, hidden_size=config.hidden_size, eps=config.layernorm_epsilon
            )
