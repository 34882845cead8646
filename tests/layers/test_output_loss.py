"""The chunked LM head + loss (layers/output_loss.py) against the unfused head: logits = h W^T
whole, the loss kernel on them, autograd through both. Values and gradients, for chunk sizes
that do and do not divide the token count, with masked tokens and the z-loss."""

import pytest
import torch

from megatron_hybrid.kernels.cross_entropy import cross_entropy_with_z_loss
from megatron_hybrid.layers.output_loss import lm_head_loss

S, B, D, V = 13, 2, 16, 40
Z = 1e-2


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(S, B, D, generator=g)
    w = torch.randn(V, D, generator=g, dtype=torch.float32) * 0.5
    target = torch.randint(0, V, (S, B), generator=g)
    mask = (torch.rand(S, B, generator=g) > 0.3).float()
    return h, w, target, mask


def _unfused(h, w, target, mask):
    h, w = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    logits = h @ w.t()
    ce, z = cross_entropy_with_z_loss(logits, target, backend="torch")
    loss = ((ce + Z * z) * mask).sum()
    (loss * 0.37).backward()  # a non-unit incoming gradient: the backward scales
    return loss.detach(), ce.detach(), z.detach(), h.grad, w.grad


@pytest.mark.parametrize("chunk", [1, 5, 13, 26, 100])
def test_matches_unfused_head(chunk):
    h, w, target, mask = _inputs()
    ref = _unfused(h, w, target, mask)
    hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    loss, ce, z = lm_head_loss(hh, ww, target, mask, mask * Z, chunk_tokens=chunk, backend="torch")
    (loss * 0.37).backward()
    torch.testing.assert_close(loss.detach(), ref[0], rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(ce.view(S, B), ref[1].float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(z.view(S, B), ref[2].float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(hh.grad, ref[3], rtol=1e-5, atol=1e-6)
    # the weight gradient accumulates in fp32 over chunks
    torch.testing.assert_close(ww.grad, ref[4], rtol=1e-6, atol=1e-6)


def test_weight_gradient_into_main_grad():
    """A weight with megatron's ``main_grad`` gets its gradient added there (no .grad value
    used): the DDP hook sees ``grad_added_to_main_grad``."""
    h, w, target, mask = _inputs(1)
    ref = _unfused(h, w, target, mask)
    hh = h.clone().requires_grad_(True)
    ww = torch.nn.Parameter(w.clone())
    ww.main_grad = torch.full_like(w, 0.5)  # what earlier micro-batches accumulated
    ww.grad_added_to_main_grad = False
    loss, _, _ = lm_head_loss(hh, ww, target, mask, mask * Z, chunk_tokens=4, backend="torch")
    loss.backward()
    assert ww.grad_added_to_main_grad
    torch.testing.assert_close(ww.main_grad, 0.5 + ref[4] / 0.37, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(hh.grad, ref[3] / 0.37, rtol=1e-5, atol=1e-6)


def test_no_grad_forward_matches_and_keeps_nothing():
    h, w, target, mask = _inputs(2)
    ref = _unfused(h, w, target, mask)
    with torch.no_grad():
        loss, ce, _ = lm_head_loss(h, w, target, mask, mask * Z, chunk_tokens=3, backend="torch")
    assert not loss.requires_grad
    torch.testing.assert_close(loss, ref[0], rtol=1e-6, atol=1e-5)


def test_bf16_hidden_states_match_unfused_bf16_head():
    """bf16 activations and weights (the trainer's case): same rounding points as the unfused
    head (bf16 logits, fp32 statistics), so the results agree to bf16 rounding of the GEMMs."""
    h, w, target, mask = _inputs(3)
    hb, wb = h.bfloat16(), w.bfloat16()
    hr, wr = hb.clone().requires_grad_(True), wb.clone().requires_grad_(True)
    ce_r, z_r = cross_entropy_with_z_loss(hr @ wr.t(), target, backend="torch")
    ((ce_r + Z * z_r) * mask).sum().backward()
    hf, wf = hb.clone().requires_grad_(True), wb.clone().requires_grad_(True)
    loss, ce, _ = lm_head_loss(hf, wf, target, mask, mask * Z, chunk_tokens=7, backend="torch")
    loss.backward()
    torch.testing.assert_close(ce.view(S, B), ce_r, rtol=0, atol=0)  # same logits, same math
    torch.testing.assert_close(hf.grad, hr.grad, rtol=0, atol=0)
    # the fused weight gradient sums fp32 chunk products: at most bf16 rounding away
    assert ((wf.grad.float() - wr.grad.float()).norm() / wr.grad.float().norm()) < 1e-2


def test_shape_mismatch_is_named():
    h, w, target, mask = _inputs()
    with pytest.raises(ValueError, match="do not match hidden states"):
        lm_head_loss(h, w, target[:-1], mask[:-1], mask[:-1], backend="torch")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_triton_and_te_wgrad_match_unfused_head():
    """On the GPU: Triton loss kernel, Transformer Engine's accumulating wgrad GEMM into an fp32
    main_grad (when TE is installed), bf16 activations, a vocabulary slice of realistic width."""
    g = torch.Generator(device="cuda").manual_seed(0)
    s, b, d, v = 3000, 1, 512, 8192
    h = (torch.randn(s, b, d, generator=g, device="cuda") * 0.5).bfloat16()
    w = (torch.randn(v, d, generator=g, device="cuda") * 0.05).bfloat16()
    target = torch.randint(0, v, (s, b), generator=g, device="cuda")
    mask = (torch.rand(s, b, generator=g, device="cuda") > 0.2).float()
    hr, wr = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    ce_r, z_r = cross_entropy_with_z_loss(hr @ wr.t(), target)
    ((ce_r + Z * z_r) * mask).sum().backward()
    hf = h.clone().requires_grad_(True)
    wf = torch.nn.Parameter(w.clone())
    wf.main_grad = torch.zeros(v, d, device="cuda")
    loss, ce, _ = lm_head_loss(hf, wf, target, mask, mask * Z, chunk_tokens=1024)
    loss.backward()
    assert wf.grad_added_to_main_grad
    # cuBLAS may tile a 1024-row GEMM differently from a 3000-row one: bf16-rounding agreement
    torch.testing.assert_close(ce.view(s, b), ce_r, rtol=1e-3, atol=1e-3)
    dh = (hf.grad.float() - hr.grad.float()).norm() / hr.grad.float().norm()
    assert dh < 1e-2, dh
    err = (wf.main_grad - wr.grad.float()).norm() / wr.grad.float().norm()
    assert err < 1e-2, err  # fp32 accumulation vs one bf16 GEMM output
