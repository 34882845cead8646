"""GDN's per-head projection split (kernels/split_heads.py): the Triton copies (interpreter on
CPU, compiled on GPU) equal torch's slicing bit for bit, both directions, at odd and 7B widths,
with a missing gradient part written as zeros; and the layer's autograd op on the Triton path
equals plain slicing, forward and backward. The GPU test runs the 7B shape at 8192 tokens."""

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
(sht,) = import_kernels("megatron_hybrid.kernels.split_heads_triton")
from megatron_hybrid.kernels.split_heads import merge_heads, split_heads  # noqa: E402

TRITON_OK = ON_GPU or interpreted(sht._split_kernel)
BACKENDS = ["torch"] + (["triton"] if TRITON_OK else [])
SHAPES = [(1, 5, 3), (37, 576, 384), (130, 24, 16), (3, 2, 1), (0, 8, 4)]  # R, P, n


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("R, P, n", SHAPES)
def test_split_and_merge_are_exact_copies(backend, dtype, R, P, n):
    x = torch.randn(R, P, device=DEVICE).to(dtype)
    head, tail = split_heads(x, n, backend=backend)
    assert torch.equal(head, x[:, :n]) and torch.equal(tail, x[:, n:])
    assert head.is_contiguous() and tail.is_contiguous()
    assert torch.equal(merge_heads(head, tail, (R, P), dtype, DEVICE, backend=backend), x)
    no_head = merge_heads(None, tail, (R, P), dtype, DEVICE, backend=backend)
    no_tail = merge_heads(head, None, (R, P), dtype, DEVICE, backend=backend)
    assert torch.equal(no_head[:, :n], torch.zeros_like(head)) and torch.equal(no_head[:, n:], tail)
    assert torch.equal(no_tail[:, n:], torch.zeros_like(tail)) and torch.equal(no_tail[:, :n], head)


def test_split_reads_a_strided_projection_and_refuses_bad_widths():
    wide = torch.randn(9, 20, device=DEVICE)
    x = wide[:, :12]  # a column slice: copied to contiguous first
    for backend in BACKENDS:
        head, tail = split_heads(x, 5, backend=backend)
        assert torch.equal(head, x[:, :5]) and torch.equal(tail, x[:, 5:])
    with pytest.raises(ValueError, match="0 < n < P"):
        split_heads(x, 12)
    with pytest.raises(ValueError, match="unknown split_heads backend"):
        split_heads(x, 5, backend="cuda")


@pytest.mark.skipif(not TRITON_OK, reason="Triton kernels unavailable")
@pytest.mark.parametrize("use_qkv, use_gate", [(True, True), (False, True), (True, False)])
def test_layer_op_on_the_triton_path_equals_slicing(use_qkv, use_gate):
    from megatron_hybrid.layers.gdn import _SplitPerHead

    torch.manual_seed(0)
    x = torch.randn(2, 7, 3, 10, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    qkv, gate = _SplitPerHead.apply(x, 6, "triton")
    ref_qkv, ref_gate = x[..., :6].reshape(2, 7, 18), x[..., 6:]
    assert torch.equal(qkv, ref_qkv) and torch.equal(gate, ref_gate)
    w_qkv, w_gate = torch.randn_like(qkv), torch.randn_like(gate)
    got = want = 0
    if use_qkv:
        got, want = got + (qkv * w_qkv).sum(), want + (ref_qkv * w_qkv).sum()
    if use_gate:
        got, want = got + (gate * w_gate).sum(), want + (ref_gate * w_gate).sum()
    (g_got,) = torch.autograd.grad(got, x)
    (g_want,) = torch.autograd.grad(want, x)
    assert torch.equal(g_got, g_want)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
def test_gpu_7b_shape():
    """8192 tokens x 30 heads of [q 96 | k 96 | v 192 | gate 192] in bf16, both directions."""
    x = torch.randn(8192 * 30, 576, device="cuda", dtype=torch.bfloat16)
    head, tail = split_heads(x, 384, backend="triton")
    assert torch.equal(head, x[:, :384]) and torch.equal(tail, x[:, 384:])
    assert torch.equal(merge_heads(head, tail, x.shape, x.dtype, "cuda", backend="triton"), x)
