"""Column splits and merges (kernels/split_columns.py): the Triton copies (interpreter on CPU,
compiled on GPU) equal torch's slicing bit for bit, both directions, for 1-4 parts at odd and 7B
widths, with missing gradient parts written as zeros; bad widths are refused; and the layers'
autograd op (layers/column_split.py) equals plain slicing, forward and backward, on both paths.
The GPU test runs the 7B shapes at 8192 tokens."""

import pytest
import torch

from tests.kernels.triton_mode import (
    DEVICE,
    ON_GPU,
    import_kernels,
    interpreted,
    triton_interpreter,  # noqa: F401 (autouse: the interpreter while each test runs)
)

# the interpreter on machines without CUDA (tests/kernels/triton_mode.py says why it is done so)
(sct,) = import_kernels("megatron_hybrid.kernels.split_columns_triton")
from megatron_hybrid.kernels.split_columns import merge_columns, split_columns  # noqa: E402

TRITON_OK = ON_GPU or interpreted(sct._split_kernel)
BACKENDS = ["torch"] + (["triton"] if TRITON_OK else [])
CASES = [(1, (3, 2)), (37, (384, 192)), (130, (96, 96, 192)), (5, (1, 1, 1, 1)), (0, (4, 4)),
         (9, (7,))]  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("R, widths", CASES)
def test_split_and_merge_are_exact_copies(backend, dtype, R, widths):
    x = torch.randn(R, sum(widths), device=DEVICE).to(dtype)
    parts = split_columns(x, widths, backend=backend)
    for part, ref in zip(parts, x.split(list(widths), dim=1), strict=True):
        assert torch.equal(part, ref) and part.is_contiguous()
    assert torch.equal(merge_columns(parts, widths, dtype, DEVICE, backend=backend), x)
    for missing in range(len(widths) if len(widths) > 1 else 0):
        some = [None if i == missing else p for i, p in enumerate(parts)]
        got = merge_columns(some, widths, dtype, DEVICE, backend=backend)
        for i, (piece, part) in enumerate(zip(got.split(list(widths), dim=1), parts, strict=True)):
            assert torch.equal(piece, torch.zeros_like(part) if i == missing else part)


def test_strided_input_and_refusals():
    x = torch.randn(9, 20, device=DEVICE)[:, :12]  # a column slice: copied to contiguous first
    for backend in BACKENDS:
        a, b = split_columns(x, (5, 7), backend=backend)
        assert torch.equal(a, x[:, :5]) and torch.equal(b, x[:, 5:])
    with pytest.raises(ValueError, match="summing to the row width 12"):
        split_columns(x, (5, 5))
    with pytest.raises(ValueError, match="1..4 positive widths"):
        split_columns(x, (2, 2, 2, 2, 4))
    with pytest.raises(ValueError, match="unknown split_columns backend"):
        split_columns(x, (5, 7), backend="cuda")
    with pytest.raises(ValueError, match="at least one of them a tensor"):
        merge_columns([None, None], (5, 7), x.dtype, DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("widths", [(6, 4), (2, 2, 6)])
@pytest.mark.parametrize("used", [(True, True, True), (False, True, True), (True, False, False)])
def test_layer_op_equals_slicing(backend, dtype, widths, used):
    """layers/column_split.py's autograd op (GDN projection, GDN q/k/v, attention q/k/v) vs
    plain slicing: forward and backward, also when some parts get no gradient."""
    from megatron_hybrid.layers.column_split import SplitColumnsPerHead

    torch.manual_seed(0)
    x = torch.randn(2, 7, 3, 10, device=DEVICE, dtype=dtype, requires_grad=True)
    parts = SplitColumnsPerHead.apply(x, widths, backend)
    refs = x.split(list(widths), dim=-1)
    got = want = 0
    for part, ref, use in zip(parts, refs, used, strict=False):
        assert torch.equal(part, ref) and part.is_contiguous()
        if use:
            w = torch.randn_like(part)
            got, want = got + (part * w).sum(), want + (ref * w).sum()
    (g_got,) = torch.autograd.grad(got, x)
    (g_want,) = torch.autograd.grad(want, x)
    assert torch.equal(g_got, g_want)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
def test_gpu_7b_shapes():
    """8192 tokens x 30 heads in bf16: the projection [q|k|v 384 | gate 192] and the conv output
    [q 96 | k 96 | v 192], both directions."""
    for widths in ((384, 192), (96, 96, 192)):
        x = torch.randn(8192 * 30, sum(widths), device="cuda", dtype=torch.bfloat16)
        parts = split_columns(x, widths, backend="triton")
        for part, ref in zip(parts, x.split(list(widths), dim=1), strict=True):
            assert torch.equal(part, ref)
        assert torch.equal(merge_columns(parts, widths, x.dtype, "cuda", backend="triton"), x)
