"""The GDN projection split (layers/gdn.py ``_SplitPerHead``) equals plain slicing, forward and
backward (its backward writes one buffer instead of zero-filling and adding two), also when one
of the two outputs gets no gradient."""

import pytest
import torch

from megatron_hybrid.layers.gdn import _SplitPerHead


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("use_qkv, use_gate", [(True, True), (False, True), (True, False)])
def test_split_equals_slicing(dtype, use_qkv, use_gate):
    torch.manual_seed(0)
    x = torch.randn(1, 7, 3, 10, dtype=dtype, requires_grad=True)
    qkv, gate = _SplitPerHead.apply(x, 6, "torch")
    ref_qkv, ref_gate = x[..., :6].reshape(1, 7, 18), x[..., 6:]
    assert torch.equal(qkv, ref_qkv) and torch.equal(gate, ref_gate) and qkv.is_contiguous()
    w_qkv, w_gate = torch.randn_like(qkv), torch.randn_like(gate)
    # an output left out of the loss gets no gradient at all (None in the backward)
    got = want = 0
    if use_qkv:
        got, want = got + (qkv * w_qkv).sum(), want + (ref_qkv * w_qkv).sum()
    if use_gate:
        got, want = got + (gate * w_gate).sum(), want + (ref_gate * w_gate).sum()
    (g_got,) = torch.autograd.grad(got, x)
    (g_want,) = torch.autograd.grad(want, x)
    assert torch.equal(g_got, g_want)
