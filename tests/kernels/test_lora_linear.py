"""Fused LoRA linear: Triton kernels and the PyTorch twin against reference.lora_linear_ref."""

import importlib.util
import logging

import pytest
import torch

from pluribus.errors import PluribusError
from pluribus.kernels.lora_linear import LoRAProjectionsFunction, lora_linear
from pluribus.kernels.reference import lora_linear_ref

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
M, N, K = 37, 70, 96  # deliberately not multiples of any block size
TOL = {torch.float32: dict(atol=2e-4, rtol=2e-4), torch.float16: dict(atol=3e-2, rtol=2e-2),
       torch.float64: dict(atol=1e-9, rtol=1e-9)}


def make(r: int, dtype: torch.dtype, bias: bool = False, m: int = M, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, K, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(N, K, generator=g) / K**0.5).to(dtype)
    a = (torch.randn(r, K, generator=g) / K**0.5).to(dtype).requires_grad_()
    b = (torch.randn(N, r, generator=g) / r**0.5).to(dtype).requires_grad_()
    c = torch.randn(N, generator=g).to(dtype) if bias else None
    dy = torch.randn(m, N, generator=g).to(dtype) * 0.7  # an incoming gradient other than 1
    return x, w, a, b, c, dy


def check_against_ref(mode: str, r: int, dtype: torch.dtype, bias: bool, m: int = M) -> None:
    x, w, a, b, c, dy = make(r, dtype, bias, m)
    y = lora_linear(x, w, a, b, 1.5, c, mode=mode)
    grads = torch.autograd.grad(y, (x, a, b), dy)
    # the oracle runs in float32 (float64 for float64) so half-precision rounding is the kernel's alone
    hi = torch.float64 if dtype == torch.float64 else torch.float32
    xr, ar, br = (t.detach().to(hi).requires_grad_() for t in (x, a, b))
    yr = lora_linear_ref(xr, w.to(hi), ar, br, 1.5, None if c is None else c.to(hi))
    refs = torch.autograd.grad(yr, (xr, ar, br), dy.to(hi))
    assert y.dtype == dtype and y.shape == (m, N)
    torch.testing.assert_close(y.to(hi), yr, **TOL[dtype])
    for got, want in zip(grads, refs, strict=True):
        torch.testing.assert_close(got.to(hi), want, **TOL[dtype])


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("r", [16, 32])
@pytest.mark.parametrize("bias", [False, True])
def test_triton_matches_reference(dtype, r, bias):
    check_against_ref("triton", r, dtype, bias)


@needs_triton
def test_triton_pads_small_rank():
    check_against_ref("triton", 4, torch.float32, False)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("m", [M, 300])  # 300 > K and > N: the twin folds s B A into W
def test_twin_matches_reference(dtype, m):
    check_against_ref("torch", 16, dtype, True, m)


def test_reference_gradcheck():
    g = torch.Generator().manual_seed(2)
    x, w, c, a, b = (torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)
                     for s in ((3, 5), (4, 5), (4,), (2, 5), (4, 2)))
    assert torch.autograd.gradcheck(lambda *t: lora_linear_ref(t[0], t[1], t[3], t[4], 1.5, t[2]), (x, w, c, a, b))


@pytest.mark.parametrize("m", [3, 12])  # 12 tokens > K=5 and N=4: the twin folds s B A into W
def test_function_gradcheck(m):
    g = torch.Generator().manual_seed(1)
    x, w, c, a, b = (torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)
                     for s in ((m, 5), (4, 5), (4,), (3, 5), (4, 3)))
    # the frozen weight and bias get correct gradients too when asked for
    fn = lambda x, w, c, a, b: LoRAProjectionsFunction.apply(x, "torch", (1.5,), torch.float64, w, c, a, b)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, c, a, b))


def test_saves_only_x_and_xa():
    x, w, a, b, _, _ = make(16, torch.float32)
    params = {t.untyped_storage().data_ptr() for t in (w, a, b)}
    saved = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lora_linear(x, w, a, b, 2.0, mode="torch")
    assert sorted(saved) == sorted([(M, K), (M, 16)])


def test_autocast_computes_in_autocast_dtype():
    x, w, a, b, _, dy = make(16, torch.float32)
    with torch.autocast(x.device.type, dtype=torch.bfloat16):  # the GPU's autocast where the tests run on CUDA
        y = lora_linear(x, w, a, b, 2.0, mode="torch")
        yr = lora_linear_ref(x, w, a, b, 2.0)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), yr.float(), atol=5e-2, rtol=2e-2)
    gx, ga = torch.autograd.grad(y, (x, a), dy.bfloat16())
    assert gx.dtype == torch.float32 and ga.dtype == torch.float32


def test_mismatched_shapes_and_rank_zero_raise():
    x, w, a, b, _, _ = make(16, torch.float32)
    for mode in ("auto", "torch", "triton"):
        with pytest.raises(PluribusError, match="do not fit"):
            lora_linear(x, w, a, b[:, :8], 1.0, mode=mode)
        with pytest.raises(PluribusError, match="rank is 0"):
            lora_linear(x, w, a[:0], b[:, :0], 1.0, mode=mode)
        with pytest.raises(PluribusError, match="does not match"):
            lora_linear(x[:, :50], w, a, b, 1.0, mode=mode)


@needs_triton
def test_triton_mode_refuses_what_it_cannot_take():
    x, w, a, b, _, _ = make(16, torch.float64)
    with pytest.raises(PluribusError, match="dtype"):
        lora_linear(x, w, a, b, 1.0, mode="triton")
    x, w, a, b, _, _ = make(16, torch.float32)
    with pytest.raises(PluribusError, match="contiguous"):
        lora_linear(x, w.t().contiguous().t(), a, b, 1.0, mode="triton")


def test_auto_takes_the_twin_with_a_logged_reason(caplog):
    x, w, a, b, _, _ = make(16, torch.float64)
    with caplog.at_level(logging.INFO, logger="pluribus.kernels"):
        y = lora_linear(x, w, a, b, 1.0, mode="auto")
    torch.testing.assert_close(y, lora_linear_ref(x, w, a, b, 1.0))
    x, w, a, b, _, _ = make(16, torch.float32)
    w_nc = w.t().contiguous().t()  # same values, column-major
    with caplog.at_level(logging.INFO, logger="pluribus.kernels"):
        y = lora_linear(x, w_nc, a, b, 1.0, mode="auto")
    torch.testing.assert_close(y, lora_linear_ref(x, w, a, b, 1.0), **TOL[torch.float32])
    if importlib.util.find_spec("triton") is not None:
        assert "not contiguous" in caplog.text and "dtype torch.float64" in caplog.text
