"""The GDN layer's per-head column splits (layers/column_split.py ``SplitColumnsPerHead``: projection ->
``([q|k|v], gate)`` and conv output -> q, k, v) equal plain slicing, forward and backward (its
backward writes one buffer instead of zero-filling and adding one per slice), also when some
outputs get no gradient; on the torch path here, the Triton one in
tests/kernels/test_split_columns.py."""

import pytest
import torch

from megatron_hybrid.layers.column_split import SplitColumnsPerHead


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("widths", [(6, 4), (2, 2, 6)])
@pytest.mark.parametrize("used", [(True, True, True), (False, True, True), (True, False, False)])
def test_split_equals_slicing(dtype, widths, used):
    torch.manual_seed(0)
    x = torch.randn(1, 7, 3, 10, dtype=dtype, requires_grad=True)
    parts = SplitColumnsPerHead.apply(x, widths, "torch")
    refs = x.split(list(widths), dim=-1)
    for part, ref in zip(parts, refs, strict=True):
        assert torch.equal(part, ref) and part.is_contiguous()
    # an output left out of the loss gets no gradient at all (None in the backward)
    got = want = 0
    for part, ref, use in zip(parts, refs, used, strict=False):
        if use:
            w = torch.randn_like(part)
            got, want = got + (part * w).sum(), want + (ref * w).sum()
    (g_got,) = torch.autograd.grad(got, x)
    (g_want,) = torch.autograd.grad(want, x)
    assert torch.equal(g_got, g_want)
