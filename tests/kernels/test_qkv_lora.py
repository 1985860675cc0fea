"""Fused q/k/v (and gate/up) LoRA projections: one Function for several projections of the same input."""

import importlib.util

import pytest
import torch

from pluribus.errors import PluribusError
from pluribus.kernels.lora_linear import LoRAProjectionsFunction, Projection, projections
from pluribus.kernels.reference import qkv_lora_ref

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
M, K = 37, 96
TOL = {torch.float32: dict(atol=3e-4, rtol=3e-4), torch.float16: dict(atol=3e-2, rtol=2e-2)}


def make(dtype, bias, shapes=((70, 16, 2.0), (34, 32, 0.5), (34, 16, 1.0))):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, M, K, generator=g).to(dtype).requires_grad_()  # a batch dim: outputs keep it
    projs = [Projection((torch.randn(n, K, generator=g) / K**0.5).to(dtype),
                        torch.randn(n, generator=g).to(dtype) if bias else None,
                        (torch.randn(r, K, generator=g) / K**0.5).to(dtype).requires_grad_(),
                        (torch.randn(n, r, generator=g) / r**0.5).to(dtype).requires_grad_(), s)
             for n, r, s in shapes]
    return x, projs


def as_ref(projs, dtype):
    return [(p.weight.to(dtype), None if p.bias is None else p.bias.to(dtype), p.lora_a, p.lora_b, p.scale)
            for p in projs]


@pytest.mark.parametrize("mode,dtype", [("torch", torch.float32), pytest.param("triton", torch.float32,
                         marks=needs_triton), pytest.param("triton", torch.float16, marks=needs_triton)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("count", [2, 3])
def test_matches_reference(mode, dtype, bias, count):
    x, projs = make(dtype, bias)
    projs = projs[:count]
    ys = projections(x, projs, mode)
    leaves = [x] + [t for p in projs for t in (p.lora_a, p.lora_b)]
    dys = [torch.randn_like(y) * 0.5 for y in ys]
    grads = torch.autograd.grad(ys, leaves, dys)
    ref_leaves = [t.detach().float().requires_grad_() for t in leaves]
    ref_projs = [Projection(p.weight, p.bias, ref_leaves[1 + 2 * i], ref_leaves[2 + 2 * i], p.scale)
                 for i, p in enumerate(projs)]
    yr = qkv_lora_ref(ref_leaves[0], as_ref(ref_projs, torch.float32))
    refs = torch.autograd.grad(yr, ref_leaves, [d.float() for d in dys])
    for y, want in zip(ys, yr, strict=True):
        assert y.shape == want.shape
        torch.testing.assert_close(y.float(), want, **TOL[dtype])
    for got, want in zip(grads, refs, strict=True):
        torch.testing.assert_close(got.float(), want, **TOL[dtype])


def test_function_gradcheck():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    params = []
    for n, r in ((4, 2), (3, 1), (3, 2)):
        params += [torch.randn(n, 5, generator=g, dtype=torch.float64), None,
                   torch.randn(r, 5, generator=g, dtype=torch.float64, requires_grad=True),
                   torch.randn(n, r, generator=g, dtype=torch.float64, requires_grad=True)]
    trainable = [x] + [p for p in params if p is not None and p.requires_grad]

    def fn(*t):
        it = iter(t[1:])
        full = [next(it) if (p is not None and p.requires_grad) else p for p in params]
        return LoRAProjectionsFunction.apply(t[0], "torch", (1.0, 0.5, 2.0), torch.float64, *full)

    assert torch.autograd.gradcheck(fn, trainable)


def test_bad_input():
    x, projs = make(torch.float32, False)
    with pytest.raises(PluribusError, match="rank is 0"):
        projections(x, [projs[0], Projection(projs[1].weight, None, projs[1].lora_a[:0], projs[1].lora_b[:, :0], 1.0)])
    with pytest.raises(PluribusError, match="do not fit"):
        projections(x, [projs[0], Projection(projs[1].weight, None, projs[1].lora_a, projs[2].lora_b, 1.0)])
