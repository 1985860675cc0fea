"""Triton kernel of the per-row cross-entropy (+ KL to a teacher) loss and gradient of one chunk of logits."""

import triton
import triton.language as tl


@triton.jit
def ce_kl_kernel(logits_ptr, labels_ptr, teacher_ptr, ce_ptr, kl_ptr, V, ignore_index, ce_scale, kl_scale,
                 temperature, HAS_TEACHER: tl.constexpr, BLOCK_V: tl.constexpr):
    """One program per row of float32 logits (C, V); the gradient overwrites the logits in place.

    Pass 1 finds lse(z) (and lse(z/T), lse(t/T) with a teacher) online; pass 2 writes
    ce_scale (softmax(z) - onehot(y)) + kl_scale T (softmax(z/T) - softmax(t/T)) and sums the KL terms.
    """
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row)
    keep = label != ignore_index
    safe = tl.where(keep, label, 0)
    keepf = keep.to(tl.float32)
    z_ptr = logits_ptr + row * V
    t_ptr = teacher_ptr + row * V
    inv_t = 1.0 / temperature
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    mq = tl.full((), float("-inf"), tl.float32)
    sq = tl.zeros((), tl.float32)
    mt = tl.full((), float("-inf"), tl.float32)
    st = tl.zeros((), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        mask = offs < V
        z = tl.load(z_ptr + offs, mask=mask, other=float("-inf"))
        m_new = tl.maximum(m, tl.max(z, 0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), 0)
        m = m_new
        if HAS_TEACHER:
            zq = z * inv_t
            mq_new = tl.maximum(mq, tl.max(zq, 0))
            sq = sq * tl.exp(mq - mq_new) + tl.sum(tl.exp(zq - mq_new), 0)
            mq = mq_new
            t = tl.load(t_ptr + offs, mask=mask, other=float("-inf")).to(tl.float32) * inv_t
            mt_new = tl.maximum(mt, tl.max(t, 0))
            st = st * tl.exp(mt - mt_new) + tl.sum(tl.exp(t - mt_new), 0)
            mt = mt_new
    lse = m + tl.log(s)
    lse_q = mq + tl.log(tl.maximum(sq, 1.0))  # sq, st >= 1 when computed (the max term is exp(0)); 0 without teacher
    lse_t = mt + tl.log(tl.maximum(st, 1.0))
    z_label = tl.load(z_ptr + safe)
    tl.store(ce_ptr + row, (lse - z_label) * keepf)
    g_ce = ce_scale * keepf
    g_kl = kl_scale * temperature * keepf
    kl = tl.zeros((), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        mask = offs < V
        z = tl.load(z_ptr + offs, mask=mask, other=float("-inf"))
        grad = g_ce * (tl.exp(z - lse) - tl.where(offs == safe, 1.0, 0.0))
        if HAS_TEACHER:
            log_q = z * inv_t - lse_q
            log_p = tl.load(t_ptr + offs, mask=mask, other=float("-inf")).to(tl.float32) * inv_t - lse_t
            p = tl.exp(log_p)
            kl += tl.sum(tl.where(p > 0, p * (log_p - log_q), 0.0), 0)
            grad += g_kl * (tl.exp(log_q) - p)
        tl.store(z_ptr + offs, grad, mask=mask)
    tl.store(kl_ptr + row, kl * temperature * temperature * keepf)
