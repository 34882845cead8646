"""Backend choice of the elementwise kernels (kernels/dispatch.py ``use_triton``): auto = Triton
on CUDA tensors or under TRITON_INTERPRET=1 (Triton importable), else torch; explicit names win;
a bad name says which op and which names are valid. Each kernel module's own bad-name test is in
its test file."""

import pytest
import torch

from megatron_hybrid.kernels import dispatch


def test_auto_backend_dispatch(monkeypatch):
    x = torch.zeros(2, 4)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.use_triton(x, "auto", "swiglu") is dispatch.triton_available()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert dispatch.use_triton(x, "auto", "swiglu") is False
    assert dispatch.use_triton(x, "triton", "swiglu") is True
    assert dispatch.use_triton(x, "torch", "swiglu") is False
    if torch.cuda.is_available():
        assert dispatch.use_triton(x.cuda(), "auto", "swiglu") is True
    with pytest.raises(ValueError, match="unknown rmsnorm backend 'cuda'; valid: auto, torch"):
        dispatch.use_triton(x, "cuda", "rmsnorm")
