"""The vocab-parallel CE + z-loss kernel (kernels/cross_entropy.py) against plain PyTorch:
values and gradients, for the Triton kernels (interpreter on CPU, compiled on GPU) and the torch
path, fp64/fp32/bf16 logits, masked-out (-inf) vocabulary slices, and a vocabulary split over 2
tensor-parallel ranks (gloo)."""

import pytest
import torch

from tests.conftest import run_python
from tests.kernels.triton_mode import (
    DEVICE,
    ON_GPU,
    import_kernels,
    interpreted,
    triton_interpreter,  # noqa: F401 (autouse: the interpreter while each test runs)
)

# the interpreter on machines without CUDA (tests/kernels/triton_mode.py says why it is done so)
(cet,) = import_kernels("megatron_hybrid.kernels.cross_entropy_triton")
from megatron_hybrid.kernels.cross_entropy import cross_entropy_with_z_loss  # noqa: E402

TRITON_OK = ON_GPU or interpreted(cet._row_stats_kernel)


def reference(logits, target, z_coeff):
    """(ce, z, d(sum(ce + z_coeff z))/d logits) by autograd through torch's own ops in fp64."""
    x = logits.detach().double().requires_grad_(True)
    lse = torch.logsumexp(x, -1)
    ce = torch.nn.functional.cross_entropy(
        x.flatten(0, -2), target.flatten(), reduction="none"
    ).view(target.shape)
    (ce + z_coeff * lse * lse).sum().backward()
    return ce, lse * lse, x.grad


def ours(logits, target, z_coeff, backend, inplace=False, weights=None):
    x = logits.detach().clone().requires_grad_(True)
    leaf = x
    if inplace:
        x = x * 1  # a non-leaf the kernel may overwrite, like the model's output
    ce, z = cross_entropy_with_z_loss(x, target, backend=backend, inplace_backward=inplace)
    w = torch.ones_like(ce) if weights is None else weights
    ((ce + z_coeff * z) * w).sum().backward()
    return ce, z, leaf.grad


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


BACKENDS = ["torch"] + (["triton"] if TRITON_OK else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("vocab", [50, 300])  # one block / several blocks with a ragged tail
def test_matches_torch(backend, dtype, vocab):
    g = torch.Generator().manual_seed(vocab)
    logits = (torch.randn(5, 3, vocab, generator=g) * 4).to(dtype).to(DEVICE)
    target = torch.randint(0, vocab, (5, 3), generator=g).to(DEVICE)
    coeff = 1e-2
    ce, z, grad = ours(logits, target, coeff, backend)
    rce, rz, rgrad = reference(logits, target, coeff)
    assert ce.dtype == torch.float32 and ce.shape == target.shape
    assert rel(ce, rce) < 1e-6 and rel(z, rz) < 1e-6
    assert grad.dtype == dtype
    assert rel(grad, rgrad) < 2e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_logits_stay_bf16(backend):
    """bf16 logits are read as bf16 (no fp32 copy) and their gradient is bf16; values match the
    fp64 reference of the same bf16 numbers to fp32 accumulation / bf16 rounding."""
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(16, 1000, generator=g) * 3).to(torch.bfloat16).to(DEVICE)
    target = torch.randint(0, 1000, (16,), generator=g).to(DEVICE)
    ce, z, grad = ours(logits, target, 1e-4, backend)
    rce, rz, rgrad = reference(logits, target, 1e-4)
    assert grad.dtype == torch.bfloat16
    assert rel(ce, rce) < 1e-6 and rel(z, rz) < 1e-6
    assert rel(grad, rgrad) < 1e-2  # bf16 rounding of the written gradient


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_and_weights(backend):
    """The gradient written into the logits' buffer equals the out-of-place one; per-token
    weights (the loss mask) scale rows, zero weights give zero rows."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 6, 70, generator=g).to(DEVICE)
    target = torch.randint(0, 70, (4, 6), generator=g).to(DEVICE)
    w = (torch.rand(4, 6, generator=g) > 0.4).float().to(DEVICE)
    _, _, g1 = ours(logits, target, 1e-3, backend, inplace=False, weights=w)
    _, _, g2 = ours(logits, target, 1e-3, backend, inplace=True, weights=w)
    torch.testing.assert_close(g1, g2, rtol=0, atol=0)
    assert (g1[w == 0] == 0).all() and (g1[w == 1].abs().sum(-1) > 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_vocabulary_entries(backend):
    """-inf logits (a masked vocabulary tail, or a whole TP slice of them) contribute nothing
    and get zero gradient; no NaN anywhere."""
    logits = torch.randn(3, 40).to(DEVICE)
    logits[:, 30:] = float("-inf")
    target = torch.tensor([1, 29, 0]).to(DEVICE)
    ce, z, grad = ours(logits, target, 1e-3, backend)
    rce, rz, rgrad = reference(logits[:, :30], target, 1e-3)
    assert torch.isfinite(ce).all() and torch.isfinite(grad).all()
    assert rel(ce, rce) < 1e-6 and (grad[:, 30:] == 0).all()
    assert rel(grad[:, :30], rgrad) < 2e-6


def test_bad_backend_named():
    with pytest.raises(ValueError, match="cross-entropy backend 'fast'.*auto, torch, triton"):
        cross_entropy_with_z_loss(
            torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), backend="fast"
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_vocab_split_over_two_tp_ranks(backend):
    """Each rank holds half the vocabulary (one rank holds only -inf in some rows); ce, z and
    each rank's gradient slice equal the single-rank result."""
    proc = run_python(
        ["tests/kernels/ce_tp_check.py", backend],
        nproc=2,
        env={"TRITON_INTERPRET": "1"},  # gloo on CPU tensors: the interpreter, also on a GPU host
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("TP-CE OK") == 2, proc.stdout
