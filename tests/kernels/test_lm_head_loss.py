"""Chunked lm_head + cross-entropy (+ KL to a teacher): kernel and twin against reference.lm_head_loss_ref."""

import importlib.util

import pytest
import torch

from pluribus.errors import PluribusError
from pluribus.kernels.lm_head_loss import ChunkedLMHeadLossFunction, chunked_lm_head_loss
from pluribus.kernels.reference import ce_kl_rows_ref, lm_head_loss_ref

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
N, D, V = 37, 24, 101
# the interpreter runs the kernel in numpy, which warns on the -inf - -inf lanes that tl.where then discards
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


def make(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(V, D, generator=g) / D**0.5).to(dtype).requires_grad_()
    b = torch.randn(V, generator=g).to(dtype).requires_grad_()
    y = torch.randint(0, V, (N,), generator=g)
    y[[3, 10, 20]] = -100
    t = torch.randn(N, V, generator=g) * 2
    t[:, 7] = float("-inf")  # a teacher that masks part of the vocabulary
    return h, w, b, y, t


@pytest.mark.parametrize("mode,dtype", [("torch", torch.float32), pytest.param("triton", torch.float32,
                         marks=needs_triton), pytest.param("triton", torch.float16, marks=needs_triton)])
@pytest.mark.parametrize("kl_weight", [0.0, 0.5])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_matches_reference(mode, dtype, kl_weight, reduction):
    h, w, b, y, t = make(dtype)
    opts = dict(bias=b, teacher_logits=t if kl_weight else None, kl_weight=kl_weight, temperature=2.0,
                reduction=reduction)
    loss, parts = chunked_lm_head_loss(h, w, y, chunk_size=8, mode=mode, return_parts=True, **opts)
    got = torch.autograd.grad(loss * 1.7, (h, w, b))  # an incoming gradient other than 1
    leaves = [x.detach().float().requires_grad_() for x in (h, w, b)]
    want_loss = lm_head_loss_ref(leaves[0], leaves[1], y, **{**opts, "bias": leaves[2]})
    want = torch.autograd.grad(want_loss * 1.7, leaves)
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.float16 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss.float(), want_loss, **tol)
    torch.testing.assert_close(parts["ce"] + kl_weight * parts["kl"], loss.detach().float(), **tol)
    for a, c in zip(got, want, strict=True):
        torch.testing.assert_close(a.float(), c, **tol)


def test_gradchecks():
    g = torch.Generator().manual_seed(4)
    h = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 3, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([1, -100, 6, 0, 2])
    t = torch.randn(5, 7, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda h, w: lm_head_loss_ref(h, w, y, teacher_logits=t, kl_weight=0.3,
                                                                  temperature=1.5), (h, w))
    opts = ("torch", -100, 0.3, 1.5, "mean", 2)
    assert torch.autograd.gradcheck(lambda h, w: ChunkedLMHeadLossFunction.apply(h, w, None, y, t, opts)[0], (h, w))


def test_rows_twin_gradient_is_autograd_gradient():
    g = torch.Generator().manual_seed(5)
    z = torch.randn(6, 11, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([1, 2, -100, 4, 10, 0])
    t = torch.randn(6, 11, generator=g, dtype=torch.float64)
    ce, kl, grad = ce_kl_rows_ref(z.detach().clone(), y, t, -100, 0.25, 0.75, 2.0)
    keep = y != -100
    ce_ref = torch.nn.functional.cross_entropy(z[keep], y[keep], reduction="sum")
    from pluribus.kernels.reference import kl_to_teacher_ref
    kl_ref = (kl_to_teacher_ref(z, t, 2.0) * keep).sum()
    torch.testing.assert_close(ce, ce_ref.detach())
    torch.testing.assert_close(kl, kl_ref.detach())
    (want,) = torch.autograd.grad(0.25 * ce_ref + 0.75 * kl_ref, z)
    torch.testing.assert_close(grad, want)


def test_no_kept_token_gives_zero():
    h, w, b, y, _ = make(torch.float32)
    loss = chunked_lm_head_loss(h, w, torch.full_like(y, -100), mode="torch")
    assert loss.item() == 0.0
    (gh,) = torch.autograd.grad(loss, (h,))
    assert gh.abs().max().item() == 0.0


def test_bad_input():
    h, w, b, y, t = make(torch.float32)
    with pytest.raises(PluribusError, match="labels"):
        chunked_lm_head_loss(h, w, y[:-1])
    with pytest.raises(PluribusError, match="does not match weight"):
        chunked_lm_head_loss(h[:, :-1], w, y)
    with pytest.raises(PluribusError, match="teacher_logits"):
        chunked_lm_head_loss(h, w, y, teacher_logits=t[:, :-1], kl_weight=1.0)
    with pytest.raises(PluribusError, match="no teacher_logits"):
        chunked_lm_head_loss(h, w, y, kl_weight=1.0)
    with pytest.raises(PluribusError, match="reduction"):
        chunked_lm_head_loss(h, w, y, reduction="max")
