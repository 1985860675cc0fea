"""Chunked lm_head + cross-entropy (+ KL to teacher logits) that never holds the full (tokens, vocab) logits.

Derivation: for token i with hidden h_i, logits z_i = W h_i + b, label y_i, teacher logits t_i, temperature T,
``q_T = softmax(z/T)``, ``p = softmax(t/T)`` and n the number of kept tokens (label != ignore_index):

    L      = (1/n) sum_i [ CE_i + w KL_i ],  CE_i = lse(z_i) - z_{i,y_i},  KL_i = T^2 sum_v p (log p - log q_T)
    dL/dz_i = (1/n) [ softmax(z_i) - onehot(y_i) + w T (q_T,i - p_i) ]
    dL/dh_i = W^T dL/dz_i,   dL/dW = sum_i dL/dz_i h_i^T,   dL/db = sum_i dL/dz_i

The loss is a scalar, so every gradient is known in the forward: rows are processed a chunk at a time (logits of
one chunk in float32, turned into their gradient in place, multiplied into dh and dW, then dropped), and the
backward only scales the stored gradients by the incoming scalar. Peak extra memory is one (chunk, V) block.
Backends: ``triton`` (per-row loss and gradient kernel, ``triton_kernels/lm_head_loss.py``; GEMMs stay in torch)
and ``torch`` (``reference.ce_kl_rows_ref``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pluribus.errors import PluribusError
from pluribus.kernels.dispatch import choose_backend, tensor_reason
from pluribus.kernels.reference import ce_kl_rows_ref, upcast


def _triton_rows(logits, labels, teacher, ignore_index, ce_scale, kl_scale, temperature):
    from pluribus.kernels.triton_kernels import lm_head_loss as tk

    rows, vocab = logits.shape
    ce = torch.empty(rows, device=logits.device, dtype=torch.float32)
    kl = torch.empty_like(ce)
    block = min(4096, 1 << (vocab - 1).bit_length())
    tk.ce_kl_kernel[(rows,)](logits, labels, teacher if teacher is not None else logits, ce, kl, vocab,
                             ignore_index, ce_scale, kl_scale, temperature, HAS_TEACHER=teacher is not None,
                             BLOCK_V=block)
    return ce.sum(), kl.sum(), logits


def default_chunk_size(tokens: int, vocab: int, hidden: int) -> int:
    """Rows per chunk so that one chunk of logits is about the size of the hidden states (as Liger does)."""
    rows = math.ceil(tokens / max(1, math.ceil(vocab / hidden)))
    return max(16, min(4096, 1 << (max(rows, 1) - 1).bit_length()))


class ChunkedLMHeadLossFunction(torch.autograd.Function):
    """``apply(hidden (N, d), weight (V, d), bias, labels (N,), teacher (N, V) | None, options)`` -> (loss, ce, kl)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, teacher, opts):
        backend, ignore_index, kl_weight, temperature, reduction, chunk = opts
        keep = int((labels != ignore_index).sum())
        scale = 1.0 / max(keep, 1) if reduction == "mean" else 1.0
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        dh = torch.empty_like(hidden) if need_h else None
        w_acc = torch.promote_types(weight.dtype, torch.float32)
        dw = torch.zeros(weight.shape, device=weight.device, dtype=w_acc) if need_w else None
        db = torch.zeros(weight.shape[0], device=weight.device, dtype=w_acc) if need_b else None
        acc = torch.promote_types(hidden.dtype, torch.float32)
        ce_total = hidden.new_zeros((), dtype=acc)
        kl_total = hidden.new_zeros((), dtype=acc)
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start : start + chunk]
            t = teacher[start : start + chunk] if teacher is not None else None
            logits = upcast(F.linear(h, weight, bias))
            args = (logits, labels[start : start + chunk], t, ignore_index, scale, scale * kl_weight, temperature)
            ce, kl, grad = _triton_rows(*args) if backend == "triton" else ce_kl_rows_ref(*args)
            ce_total += ce
            kl_total += kl
            if need_h:
                dh[start : start + chunk] = grad.to(hidden.dtype) @ weight
            if need_w:
                dw.addmm_(grad.t().to(w_acc), h.to(w_acc))
            if need_b:
                db += grad.sum(0)
        ce_total *= scale
        kl_total *= scale
        loss = ce_total + kl_weight * kl_total
        ctx.save_for_backward(dh, dw, db)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        ctx.mark_non_differentiable(ce_total, kl_total)
        return loss, ce_total, kl_total

    @staticmethod
    def backward(ctx, g, _g_ce, _g_kl):
        dh, dw, db = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        dh = dh * g.to(dh.dtype) if dh is not None else None
        dw = (dw * g).to(w_dtype) if dw is not None else None
        db = (db * g).to(b_dtype) if db is not None else None
        return dh, dw, db, None, None, None


def chunked_lm_head_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                         bias: torch.Tensor | None = None, ignore_index: int = -100,
                         teacher_logits: torch.Tensor | None = None, kl_weight: float = 0.0,
                         temperature: float = 1.0, reduction: str = "mean", chunk_size: int | None = None,
                         mode: str = "auto", return_parts: bool = False):
    """Cross-entropy of ``hidden @ weight.T (+ bias)`` against ``labels``, plus ``kl_weight`` times the KL to a teacher.

    Loss = (1/n) sum over kept tokens of [CE + kl_weight * T^2 KL(softmax(teacher/T) || softmax(logits/T))],
    n = number of tokens whose label != ignore_index (``reduction="sum"``: no 1/n; no kept token: loss 0).
    The full (tokens, vocab) logits are never materialized: gradients are computed chunk by chunk in the forward.

    Shapes: hidden (..., d); weight (V, d) (the lm_head / tied embedding); bias (V,); labels (...) aligned with
    hidden, i.e. already shifted for causal LM (``hidden[:, :-1]`` with ``labels[:, 1:]``); teacher_logits
    (..., V) of the same vocabulary. ``chunk_size``: rows per chunk (default: chunk logits ~ hidden size).
    ``mode``: auto | triton | torch. Returns the scalar loss, or ``(loss, {"ce": ce, "kl": kl})`` (detached
    parts, already divided by n) when ``return_parts``. Raises PluribusError on mismatched shapes or options.
    """
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise PluribusError(f"lm_head_loss: hidden {tuple(hidden.shape)} does not match weight {tuple(weight.shape)}")
    if labels.shape != hidden.shape[:-1]:
        raise PluribusError(f"lm_head_loss: labels {tuple(labels.shape)} must have the shape of hidden without its "
                            f"last dim, {tuple(hidden.shape[:-1])} (shift them before calling)")
    if labels.is_floating_point():
        raise PluribusError(f"lm_head_loss: labels must be integer token ids, got {labels.dtype}")
    vocab = weight.shape[0]
    if bias is not None and bias.shape != (vocab,):
        raise PluribusError(f"lm_head_loss: bias {tuple(bias.shape)} does not match weight {tuple(weight.shape)}")
    if teacher_logits is not None and teacher_logits.shape != (*labels.shape, vocab):
        raise PluribusError(f"lm_head_loss: teacher_logits {tuple(teacher_logits.shape)} must be "
                            f"{(*labels.shape, vocab)} (same tokens and vocabulary as the student)")
    if kl_weight != 0.0 and teacher_logits is None:
        raise PluribusError("lm_head_loss: kl_weight is set but no teacher_logits were given")
    if reduction not in ("mean", "sum"):
        raise PluribusError(f"lm_head_loss: unknown reduction '{reduction}'. Available: mean, sum.")
    if temperature <= 0:
        raise PluribusError(f"lm_head_loss: temperature must be > 0, got {temperature}")
    if chunk_size is not None and chunk_size < 1:
        raise PluribusError(f"lm_head_loss: chunk_size must be >= 1, got {chunk_size}")
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1).to(torch.int64).contiguous()
    teacher = None
    if teacher_logits is not None and kl_weight != 0.0:
        teacher = teacher_logits.reshape(-1, vocab).detach().contiguous()
    chunk = chunk_size or default_chunk_size(h.shape[0], vocab, h.shape[1])
    backend = choose_backend(mode, tensor_reason([h, weight, bias, teacher], h.dtype), "lm_head_loss")
    opts = (backend, ignore_index, float(kl_weight), float(temperature), reduction, chunk)
    loss, ce, kl = ChunkedLMHeadLossFunction.apply(h, weight, bias, y, teacher, opts)
    return (loss, {"ce": ce, "kl": kl}) if return_parts else loss
