"""The model's MLP runs our fused SwiGLU (layers/swiglu.py) through megatron-core's activation
module hook (``use_te_activation_func``): the module is in place in every MLP, adds no state-dict
key, and the model computes exactly what megatron's own eager SwiGLU computed before (the same
logits and gradients, bitwise, on the torch path; to float32 rounding on the Triton kernel run in
the interpreter). Runs in a subprocess (the CPU shim patches torch.cuda process-wide)."""

from __future__ import annotations

import textwrap

import pytest

from tests.conftest import run_python

SCRIPT = textwrap.dedent(
    """
    import os
    os.environ["TRITON_INTERPRET"] = "1"  # bind Triton to its interpreter (CPU)...
    import torch
    from megatron_hybrid.kernels import swiglu_triton  # noqa: F401
    del os.environ["TRITON_INTERPRET"]  # ...but run the torch paths until the Triton pass

    from megatron_hybrid.layers.swiglu import SwiGLU
    from megatron_hybrid.models.olmo_hybrid.model import build_model
    from megatron_hybrid.models.olmo_hybrid.presets import tiny
    from megatron_hybrid.parallel import state

    state.initialize()
    cfg = tiny().replace(gdn_backend="torch")
    tcfg = cfg.transformer_config()
    assert tcfg.use_te_activation_func and not tcfg.bias_activation_fusion
    ours = build_model(cfg, tcfg, parallel_output=False)
    # megatron's own eager glu: the config this repo used on CPU before the kernel
    old_cfg = cfg.transformer_config(use_te_activation_func=False, bias_activation_fusion=False)
    ref = build_model(cfg, old_cfg, parallel_output=False)

    mlps = [m for m in ours.modules() if type(m).__name__ == "MLP"]
    assert mlps and all(isinstance(m.activation_func, SwiGLU) for m in mlps), mlps
    assert not any(isinstance(m, SwiGLU) for m in ref.modules())
    assert list(ours.state_dict()) == list(ref.state_dict())
    sharded = ours.sharded_state_dict()
    assert not [k for k in sharded if "activation_func" in k]
    assert sorted(sharded) == sorted(ref.sharded_state_dict())
    ref.load_state_dict(ours.state_dict())

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=g)
    pos = torch.arange(24)[None].expand(2, -1)

    def run(model):
        model.zero_grad(set_to_none=True)
        logits = model(ids, pos, None)
        (logits.float() ** 2).mean().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    ref_logits, ref_grads = run(ref)
    logits, grads = run(ours)  # auto backend on CPU, no interpreter: the torch path
    assert torch.equal(logits, ref_logits)
    assert all(torch.equal(grads[n], ref_grads[n]) for n in ref_grads)

    for m in mlps:
        m.activation_func.backend = "triton"  # the Triton kernel, interpreted
    # Triton launches need the variable set; the short convs stay on torch (interpreted: slow)
    import functools
    from megatron_hybrid.kernels import conv
    from megatron_hybrid.layers import gdn
    gdn.causal_conv1d = functools.partial(conv.causal_conv1d, backend="torch")
    os.environ["TRITON_INTERPRET"] = "1"
    logits, grads = run(ours)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)
    state.destroy()
    print("SWIGLU MLP OK", len(mlps))
    """
)


def test_model_mlp_uses_fused_swiglu_and_matches_megatron_glu():
    proc = run_python(["-c", SCRIPT])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SWIGLU MLP OK" in proc.stdout


def test_swiglu_module_refuses_what_it_does_not_compute():
    import torch.nn.functional as F

    from megatron_hybrid.layers.swiglu import SwiGLU
    from megatron_hybrid.models.olmo_hybrid.presets import tiny

    cfg = tiny()
    SwiGLU(cfg.transformer_config())  # the model's own config is fine
    with pytest.raises(ValueError, match="activation_func_clamp_value"):
        SwiGLU(cfg.transformer_config(activation_func_clamp_value=7.0))
    with pytest.raises(ValueError, match="activation_func="):
        SwiGLU(cfg.transformer_config(activation_func=F.gelu))
    m = SwiGLU(cfg.transformer_config())
    assert not list(m.parameters()) and not m.state_dict()
