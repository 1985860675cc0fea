"""RoPE in place with position_ids: Triton kernel and twin against reference.rope_ref."""

import importlib.util

import pytest
import torch

from pluribus.errors import PluribusError
from pluribus.kernels.reference import rope_ref
from pluribus.kernels.rope import RoPEFunction, rope_

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
B, T, HQ, HK, D = 2, 13, 6, 2, 24  # 6 and 12 are not powers of two: masked blocks
POS = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3, 4], list(range(13))])  # row 0 packs three sequences


def tables(dtype):
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    ang = torch.arange(32, dtype=torch.float64)[:, None] * inv
    emb = torch.cat([ang, ang], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


@pytest.mark.parametrize("mode,dtype", [("torch", torch.float32), ("torch", torch.float64),
                                        pytest.param("triton", torch.float32, marks=needs_triton),
                                        pytest.param("triton", torch.float16, marks=needs_triton)])
@pytest.mark.parametrize("layout", ["per-token", "table"])
def test_matches_reference(mode, dtype, layout):
    g = torch.Generator().manual_seed(0)
    cos, sin = tables(dtype)
    args = (cos[POS], sin[POS], None) if layout == "per-token" else (cos, sin, POS)
    qb = torch.randn(B, T, HQ * D, generator=g).to(dtype).requires_grad_()
    kb = torch.randn(B, T, HK * D, generator=g).to(dtype).requires_grad_()
    q, k = (qb * 1).view(B, T, HQ, D), (kb * 1).view(B, T, HK, D)  # views of projection outputs, as in a model
    ptr = q.data_ptr()
    qo, ko = rope_(q, k, *args, mode=mode)
    assert qo.data_ptr() == ptr  # in place
    qr, kr = rope_ref(qb.view(B, T, HQ, D).float(), kb.view(B, T, HK, D).float(),
                      *(a.float() if a is not None and a.is_floating_point() else a for a in args))
    tol = dict(atol=2e-3, rtol=2e-3) if dtype == torch.float16 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(qo.float(), qr, **tol)
    torch.testing.assert_close(ko.float(), kr, **tol)
    gq, gk = torch.randn(qr.shape, generator=g), torch.randn(kr.shape, generator=g)
    got = torch.autograd.grad((qo.float() * gq).sum() + (ko.float() * gk).sum(), (qb, kb))
    qr2, kr2 = (t.detach().float().requires_grad_() for t in (qb, kb))
    a2, b2 = rope_ref(qr2.view(B, T, HQ, D), kr2.view(B, T, HK, D),
                      *(a.float() if a is not None and a.is_floating_point() else a for a in args))
    want = torch.autograd.grad((a2 * gq).sum() + (b2 * gk).sum(), (qr2, kr2))
    for x, y in zip(got, want, strict=True):
        torch.testing.assert_close(x.float(), y, **tol)


def test_gradchecks():
    cos, sin = tables(torch.float64)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 5, 2, D, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 5, 1, D, generator=g, dtype=torch.float64, requires_grad=True)
    pos = POS[:1, :5]
    assert torch.autograd.gradcheck(lambda q, k: rope_ref(q, k, cos, sin, pos), (q, k))
    flat = pos.reshape(-1)
    assert torch.autograd.gradcheck(lambda q: RoPEFunction.apply(q * 1, cos, sin, flat, "torch"), (q,))


def test_bad_shapes():
    cos, sin = tables(torch.float32)
    q, k = torch.randn(B, T, HQ, D), torch.randn(B, T + 1, HK, D)
    with pytest.raises(PluribusError, match="equal B, T, D"):
        rope_(q, k, cos[POS], sin[POS])
    with pytest.raises(PluribusError, match="head dim"):
        rope_(q, q.clone(), cos[:, :8], sin[:, :8], POS)
    with pytest.raises(PluribusError, match="tables"):
        rope_(q, q.clone(), cos[POS], sin[POS], POS)
