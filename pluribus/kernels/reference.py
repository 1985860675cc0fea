"""The one readable PyTorch reference of every kernel: the test oracle, and the math the twins must match.

Each ``<op>_ref`` is plain autograd code written for clarity, not speed; tests and ``bench/fused_kernels.py`` import these
rather than re-deriving them. ``ce_kl_rows_ref`` is also the PyTorch twin of the per-chunk loss kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def upcast(x: torch.Tensor) -> torch.Tensor:
    """16-bit floats to float32 for softmax-type math; float32 and float64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def lora_linear_ref(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                    scale: float, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``y = x W^T + b + s (x A^T) B^T``; x (..., K), W (N, K), A (r, K), B (N, r) -> y (..., N)."""
    y = F.linear(x, weight, bias)
    return y + F.linear(F.linear(x, lora_a), lora_b) * scale


def qkv_lora_ref(x: torch.Tensor, projections: list[tuple]) -> tuple[torch.Tensor, ...]:
    """Several LoRA projections of the same input: one ``lora_linear_ref`` per ``(W, bias, A, B, scale)``."""
    return tuple(lora_linear_ref(x, w, a, b, s, bias) for (w, bias, a, b, s) in projections)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_ref(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
             position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding ``x cos + rotate_half(x) sin`` (the Hugging Face convention), out of place.

    q (B, T, Hq, D), k (B, T, Hk, D), token-major. Either ``cos``/``sin`` are per token, (B or 1, T, D), as a
    Hugging Face rotary module returns them, or they are tables (P, D) read at ``position_ids`` (B, T) (packed
    sequences restart their positions at 0).
    """
    if position_ids is not None:
        cos, sin = cos[position_ids], sin[position_ids]  # (B, T, D)
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # broadcast over heads
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def kl_to_teacher_ref(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      temperature: float = 1.0) -> torch.Tensor:
    """Per row ``T^2 KL(softmax(t/T) || softmax(z/T))`` (forward KL, teacher first), shape (N,)."""
    log_q = F.log_softmax(upcast(student_logits) / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.to(log_q.dtype) / temperature, dim=-1)
    p = log_p.exp()
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))  # 0 log 0 = 0 for masked vocab
    return terms.sum(-1) * temperature**2


def lm_head_loss_ref(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                     bias: torch.Tensor | None = None, ignore_index: int = -100,
                     teacher_logits: torch.Tensor | None = None, kl_weight: float = 0.0,
                     temperature: float = 1.0, reduction: str = "mean") -> torch.Tensor:
    """``CE(h W^T + b, labels) + kl_weight * T^2 KL(teacher || student)`` over the tokens whose label is kept.

    hidden (..., d), weight (V, d), labels (...), teacher_logits (..., V). Both terms are summed over kept tokens
    and, for ``reduction="mean"``, divided by their count (0 when no token is kept). Materializes all logits.
    """
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1)
    logits = upcast(F.linear(h, weight, bias))
    keep = y != ignore_index
    ce = F.cross_entropy(logits, torch.where(keep, y, 0), reduction="none") * keep
    total = ce.sum()
    if teacher_logits is not None and kl_weight != 0.0:
        kl = kl_to_teacher_ref(logits, teacher_logits.reshape(-1, logits.shape[-1]), temperature) * keep
        total = total + kl_weight * kl.sum()
    if reduction == "mean":
        total = total / keep.sum().clamp(min=1)
    return total


def ce_kl_rows_ref(logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None,
                   ignore_index: int, ce_scale: float, kl_scale: float, temperature: float
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss and gradient of one chunk of logits, without autograd (twin of the Triton chunk kernel).

    logits (C, V) float32 (or float64). With ``lse = logsumexp(z)``, ``q_T = softmax(z/T)``, ``p = softmax(t/T)``:
      CE_i = lse_i - z_{i,y_i};                 dCE/dz = softmax(z) - onehot(y)
      KL_i = T^2 sum_v p (log p - log q_T);     dKL/dz = T (q_T - p)
    Rows with ``label == ignore_index`` contribute nothing. Returns (sum of CE, sum of KL, dlogits) where
    ``dlogits = ce_scale dCE/dz + kl_scale dKL/dz`` (the scales carry the 1/n of a mean and the KL weight).
    """
    keep = labels != ignore_index
    safe = torch.where(keep, labels, 0)
    lse = torch.logsumexp(logits, dim=-1)
    ce = (lse - logits.gather(1, safe[:, None]).squeeze(1)) * keep
    grad = torch.softmax(logits, dim=-1)
    grad[torch.arange(len(safe), device=logits.device), safe] -= 1.0
    grad *= ce_scale
    kl_sum = logits.new_zeros(())
    if teacher_logits is not None:
        t = teacher_logits.to(logits.dtype)
        log_q = torch.log_softmax(logits / temperature, dim=-1)
        log_p = torch.log_softmax(t / temperature, dim=-1)
        p = log_p.exp()
        kl = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1) * temperature**2
        kl_sum = (kl * keep).sum()
        grad += (kl_scale * temperature) * (log_q.exp() - p)
    grad *= keep[:, None]
    return ce.sum(), kl_sum, grad
