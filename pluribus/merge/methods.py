"""Merge math: pure functions over tensors (task vectors in, merged tensor out); no files, no global RNG.

A *task vector* is ``delta_t = theta_t - theta_base`` (Ilharco et al., 2023). Every method takes the deltas of
one tensor from T experts and returns the merged delta; the caller adds it to the base. The methods are registered
in merge/registry.py (their options, defaults and math), each composed of the steps here; registry.merge_deltas
dispatches to them. Randomness comes only from an explicit ``torch.Generator``. Arithmetic runs in float32
(float64 stays float64).

``mergekit=True`` reproduces mergekit 0.1.5 where its semantics differ from the papers:
  * TIES sign election by the *weighted* sum of trimmed deltas (the paper votes with unweighted mass);
  * trimming keeps ``max(1, int(density * n))`` entries by a stable argsort (the paper: top-k of the tensor);
  * DARE rescales the survivors to the original L1 norm (the paper: exactly ``1 / (1 - p)``);
  * ``dare_ties`` sums the agreeing weighted deltas without dividing (``normalize: false``).

``pcb`` has no mergekit counterpart (mergekit 0.1.5 does not implement it); it follows the paper (see :func:`pcb`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from pluribus.errors import PluribusError

Tensor = torch.Tensor


@dataclass(frozen=True)
class MethodParams:
    """Parameters of one merge, already resolved per expert.

    weights: w_t per expert; density: fraction kept by trimming per expert (TIES, magnitude);
    drop: DARE drop rate p per expert; lam: the final scale lambda; normalize: divide by the summed
    weights (of agreeing experts for TIES); thresholds: per-expert magnitude thresholds for global
    trimming (None: trim each tensor on its own); mergekit: reproduce mergekit's semantics; dtype: the
    arithmetic dtype (None: float32, or float64 for float64 inputs; mergekit computes in its config's dtype).
    """

    weights: tuple[float, ...]
    density: tuple[float, ...] | None = None
    drop: tuple[float, ...] | None = None
    lam: float = 1.0
    normalize: bool | None = None
    thresholds: tuple[float, ...] | None = None
    mergekit: bool = False
    dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        # a NaN weight or lambda would silently turn every merged tensor into NaN
        for name, values in (("weight", self.weights), ("lambda", (self.lam,))):
            bad = next((v for v in values if not math.isfinite(v)), None)
            if bad is not None:
                raise PluribusError(f"{name} must be a finite number (got {bad})")


def work_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def check_finite(t: Tensor, name: str) -> None:
    """Raise PluribusError naming ``name`` when ``t`` holds NaN or Inf."""
    if not t.is_floating_point() or math.isfinite(float(t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32))):
        return  # a finite sum means no NaN/Inf (an overflowing sum falls through to the exact check)
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise PluribusError(f"tensor '{name}' holds {bad} NaN/Inf value(s); fix or drop that input")


def check_fraction(value: float, name: str, *, low_open: bool = True, high_open: bool = False) -> None:
    """Raise PluribusError unless ``value`` is in (0, 1] (or the interval the flags say)."""
    if not math.isfinite(value):
        raise PluribusError(f"{name} must be a finite number (got {value})")
    ok_low = value > 0 if low_open else value >= 0
    ok_high = value < 1 if high_open else value <= 1
    if not (ok_low and ok_high):
        lo = "(0" if low_open else "[0"
        hi = "1)" if high_open else "1]"
        raise PluribusError(f"{name} = {value} is out of range; it must be in {lo}, {hi}")


# ------------------------------------------------------------------------------------------- linear


def linear(tensors: Sequence[Tensor], weights: Sequence[float], normalize: bool = True) -> Tensor:
    """Weighted average of whole tensors: ``sum_t w_t theta_t / sum_t w_t`` (model soups, arXiv:2203.05482).

    With ``normalize=False`` the plain weighted sum. Shapes: every tensor alike; returns the same shape.
    """
    dtype = work_dtype(tensors[0])
    out = torch.zeros_like(tensors[0], dtype=dtype)
    for t, w in zip(tensors, weights, strict=True):
        out.add_(t.to(dtype), alpha=float(w))
    if normalize:
        total = float(sum(weights))
        if abs(total) < 1e-8:
            raise PluribusError("linear merge weights sum to 0; give weights with a non-zero sum")
        out.div_(total)
    return out


def task_arithmetic(deltas: Sequence[Tensor], weights: Sequence[float], lam: float = 1.0) -> Tensor:
    """Merged task vector ``lambda * sum_t w_t delta_t`` (Task Arithmetic, Ilharco et al. 2023, arXiv:2212.04089)."""
    return linear(deltas, weights, normalize=False).mul_(lam)


# ------------------------------------------------------------------------------------------ pruning


def keep_count(numel: int, density: float, mergekit: bool = False) -> int:
    """How many entries trimming keeps: ``round(density n)`` (paper) or ``max(1, int(density n))`` (mergekit)."""
    if density >= 1:
        return numel
    if density <= 0 or numel == 0:
        return 0
    return max(1, int(density * numel)) if mergekit else int(round(density * numel))


def kth_largest(values: Tensor, k: int) -> float:
    """The k-th largest of non-negative float32 ``values`` (1 <= k <= n), in O(n) by a histogram of bit patterns.

    Non-negative floats order like their int32 bit patterns: count the top 16 bits, find the bucket holding
    the k-th largest, then select inside that bucket only (a quickselect over a small remainder).
    """
    bits = values.reshape(-1).view(torch.int32) >> 16
    hist = torch.bincount(bits, minlength=1 << 15)
    above = torch.flip(hist, [0]).cumsum(0)
    j = int(torch.searchsorted(above, torch.tensor(k)).item())
    rank = k - (int(above[j - 1]) if j > 0 else 0)
    inside = values.reshape(-1)[bits == (hist.numel() - 1 - j)]
    return float(torch.kthvalue(inside, inside.numel() - rank + 1).values)


def top_k_mask(values: Tensor, k: int, mergekit: bool = False) -> Tensor:
    """Boolean mask of the k largest non-negative ``values``: ``values >= the k-th largest``.

    Entries tied with the k-th largest are all kept (bf16 deltas tie often; no tie-break by position is
    more principled). In mergekit's mode a tie at the cut is resolved exactly as mergekit does (its argsort),
    so the kept set matches bit for bit; without a tie the set is unique and found in O(n) either way.
    """
    flat = values.reshape(-1)
    mask = flat >= kth_largest(flat, k)
    if mergekit and int(mask.sum()) > k:
        mask = torch.zeros_like(flat, dtype=torch.bool)
        mask[torch.argsort(flat, descending=True)[:k]] = True
    return mask.reshape(values.shape)


def magnitude_prune(delta: Tensor, density: float, *, threshold: float | None = None, mergekit: bool = False) -> Tensor:
    """Keep the ``density`` fraction of entries of largest magnitude; zero the rest.

    ``threshold`` given (global trimming): keep ``|x| >= threshold`` instead of a per-tensor top-k.
    Per tensor: the top ``keep_count`` entries (all entries tied at the cut are kept; mergekit's argsort in its mode).
    """
    return _trim_(delta.clone(), density, threshold, mergekit)


def _trim_(d: Tensor, density: float, threshold: float | None, mergekit: bool) -> Tensor:
    """:func:`magnitude_prune` in place on ``d``."""
    if threshold is not None:
        return d.mul_(d.abs() >= threshold)
    k = keep_count(d.numel(), density, mergekit)
    if k < d.numel():
        d.mul_(top_k_mask(d.abs().float(), k, mergekit) if k else 0)
    return d


def dare(delta: Tensor, p: float, generator: torch.Generator, *, mergekit: bool = False) -> Tensor:
    """Drop And REscale (Yu et al. 2024, arXiv:2311.03099): ``m ~ Bernoulli(1 - p)``, ``m * delta / (1 - p)``.

    The 1/(1-p) rescale keeps the expectation: ``E[dare(delta)] = delta``. With ``mergekit=True`` the mask is
    drawn as mergekit 0.1.5 draws it (``bernoulli`` of a ``1 - p`` tensor in float32, or in bfloat16 for bf16
    tensors), so the same seed and tensor order give the same mask, and the survivors are rescaled to the
    original L1 norm instead (mergekit's ``rescale``). ``p = 0`` returns delta.
    """
    if p <= 0:
        return delta.clone()
    if not mergekit:
        if p >= 1:
            return torch.zeros_like(delta)
        keep = torch.rand(delta.shape, generator=generator, dtype=torch.float32, device=delta.device) >= p
        return delta * keep.to(delta.dtype) / (1.0 - p)
    # mergekit draws even when everything is dropped: later masks depend on the generator's position
    work = delta.dtype if delta.dtype == torch.bfloat16 else torch.float32
    keep = torch.bernoulli(torch.full_like(delta, 1.0 - p, dtype=work), generator=generator)
    full = delta.to(work)
    masked = full * keep
    before, after = full.abs().sum(), masked.abs().sum()
    if before < 1e-7 or after < 1e-7:
        return masked.to(delta.dtype)
    return (masked * (before / after)).to(delta.dtype)


# --------------------------------------------------------------------------------------------- TIES


def elect_sign(deltas: Tensor, weights: Tensor | None = None, *, mergekit: bool = False) -> Tensor:
    """TIES sign election over stacked deltas ``[T, ...]``: ``sgn(sum_t delta_t)`` (total mass, arXiv:2306.01708).

    ``weights`` ([T]) are applied first when given (mergekit votes with weighted deltas). A zero total
    elects sign 0 (no expert agrees) in the paper's semantics, +1 in mergekit's.
    """
    stacked = deltas if weights is None else deltas * weights.reshape(-1, *([1] * (deltas.dim() - 1)))
    total = stacked.sum(dim=0)
    if mergekit:
        return (total >= 0).to(deltas.dtype) * 2 - 1
    return torch.sign(total)


def disjoint_merge(
    deltas: Tensor, weights: Tensor, sign: Tensor, normalize: bool = True, *, mergekit: bool = False
) -> Tensor:
    """Sum (or weighted mean when ``normalize``) of the entries whose sign equals the elected ``sign``.

    ``deltas`` [T, ...] (unweighted), ``weights`` [T]. Entries that were trimmed to zero never agree.
    Agreement is judged on ``w_t delta_t`` in mergekit's mode (it differs only for negative weights).
    """
    w = weights.reshape(-1, *([1] * (deltas.dim() - 1)))
    weighted = deltas * w
    judged = weighted if mergekit else deltas
    agree = (torch.sign(judged) == sign.unsqueeze(0)) & (judged != 0)
    agree = agree.to(deltas.dtype)
    merged = (weighted * agree).sum(dim=0)
    if not normalize:
        return merged
    divisor = (w * agree).sum(dim=0)
    divisor[divisor == 0] = 1
    return merged / divisor


# ---------------------------------------------------------------------------------------------- PCB


def _minmax(x: Tensor) -> Tensor:
    """``Norm`` of PCB-Merging: ``(x - min x) / (max x - min x)`` over the tensor's entries, into [0, 1].

    A constant tensor (max = min: an all-zero task vector) has no entry that stands out: it maps to zeros (the
    official code would divide 0 by 0 there).
    """
    lo, hi = torch.aminmax(x)
    span = hi - lo
    return (x - lo) / span if bool(span > 0) else torch.zeros_like(x)


def pcb(
    deltas: Sequence[Tensor],
    density: float | Sequence[float] = 1.0,
    weights: Sequence[float] | None = None,
    lam: float = 1.0,
) -> Tensor:
    """PCB-Merging (Du et al. 2024, NeurIPS, arXiv:2410.02396, Sec. 3) of the N task vectors of one tensor.

    ``tau_i`` = ``deltas[i]``; ``Norm`` = min-max over the tensor's entries (:func:`_minmax`); Softmax over the
    tensor's entries:
      * intra-balancing  ``beta_intra_i = Softmax(N * Norm(tau_i * tau_i))``
      * inter-balancing  ``beta_inter_i = sum_j Softmax(Norm(tau_i * tau_j))`` (j = 1..N, i included)
      * ``beta_i = beta_intra_i * beta_inter_i``
      * drop: ``m_i = beta_i >= sorted(beta_i)[(1 - r) D]``: the top ``density`` fraction of ``beta_i`` is kept
        (the paper's ratio r, the official code's ``pcb_ratio``, is this kept fraction, as TIES's density is);
        ``beta_hat_i = m_i * beta_i``
      * rescale: ``tau = sum_i beta_hat_i w_i tau_i / sum_i beta_hat_i`` (0 where no task keeps the entry), times lam.

    ``weights`` w_i scale each task vector in the numerator only, as the official code's per-task coefficients do
    (its evolutionary search tunes them); the balancing scores are computed from the unweighted task vectors, so
    all-ones weights are the paper. An entry where ``tau_i`` is exactly 0 is no parameter of task i and is never
    kept (as in TIES's disjoint merge): otherwise a module one adapter lacks (stored as zeros) would pull the
    other adapters' deltas toward 0. ``density`` is one value or one per task.

    Where the official code (github.com/duguodong7/pcb-merging) departs from the paper, this follows the paper:
    the code drops the softmax denominators and replaces the inter softmax by tanh, clips the 0.01% largest and
    smallest |tau| first, and min-max normalises the kept scores (so its smallest kept score is 0); it also
    normalises over the whole flattened model, where this normalises per tensor (the merge streams tensors).

    The ratio ``beta_hat_i / sum_j beta_hat_j`` is a softmax over tasks of ``log beta_i``, computed that way:
    ``e^(-N)`` of the intra softmax underflows float32 once N passes ~87 tasks.
    Shapes: N tensors of one shape; returns that shape in the work dtype.
    """
    n = len(deltas)
    dens = [float(density)] * n if isinstance(density, int | float) else [float(d) for d in density]
    w = [1.0] * n if weights is None else [float(x) for x in weights]
    if len(dens) != n or len(w) != n:
        raise PluribusError(f"pcb got {n} task vectors but {len(dens)} densities and {len(w)} weights; give one each")
    for d in dens:
        check_fraction(d, "pcb density")
    dtype = work_dtype(deltas[0])
    shape = deltas[0].shape
    taus = [d.to(dtype).reshape(-1) for d in deltas]
    if taus[0].numel() == 0:
        return torch.zeros(shape, dtype=dtype)
    inter = _pcb_inter(taus)
    scores = []  # log beta_hat_i: -inf where task i's entry is dropped
    for i in range(n):
        logits = _minmax(taus[i] * taus[i]).mul_(n)  # log of the intra softmax, times beta_inter_i
        log_beta = logits.sub_(torch.logsumexp(logits, dim=0)).add_(inter[i].log_())
        inter[i] = None  # type: ignore[call-overload]
        scores.append(_pcb_drop(log_beta, taus[i], dens[i]))
    return _pcb_rescale(taus, w, scores).mul_(lam).reshape(shape)


def _pcb_inter(taus: list[Tensor]) -> list[Tensor]:
    """PCB's inter-balancing ``beta_inter_i = sum_j Softmax(Norm(tau_i * tau_j))`` of every task i (flat)."""
    n = len(taus)
    inter = [torch.zeros_like(taus[0]) for _ in range(n)]
    for i in range(n):
        for j in range(i, n):  # tau_i * tau_j is symmetric: one softmax serves both tasks
            s = torch.softmax(_minmax(taus[i] * taus[j]), dim=0)
            inter[i].add_(s)
            if j != i:
                inter[j].add_(s)
    return inter


def _pcb_drop(log_beta: Tensor, tau: Tensor, density: float) -> Tensor:
    """PCB's drop of one task, in place: ``log_beta`` where the entry is among the top ``density`` fraction of its
    scores and ``tau`` is not 0 there, else -inf."""
    k = keep_count(log_beta.numel(), density)
    kept = tau != 0
    if k < log_beta.numel():
        cut = torch.kthvalue(log_beta, log_beta.numel() - k + 1).values if k else math.inf
        kept &= log_beta >= cut
    return log_beta.masked_fill_(~kept, -math.inf)


def _pcb_rescale(taus: list[Tensor], weights: list[float], scores: list[Tensor]) -> Tensor:
    """PCB's rescale ``sum_i beta_hat_i w_i tau_i / sum_i beta_hat_i`` from ``scores`` = log beta_hat_i (a softmax
    over tasks, shifted by the largest score: exact where the scores underflow), 0 where no task keeps the entry."""
    dtype = taus[0].dtype
    top = torch.stack(scores).amax(dim=0)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # no task kept it: every weight is 0
    num, den = torch.zeros_like(taus[0]), torch.zeros_like(taus[0])
    for tau, wt, score in zip(taus, weights, scores, strict=True):
        e = (score - top).exp_()
        den.add_(e)
        num.add_(e.mul_(tau), alpha=wt)
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(dtype).tiny), torch.zeros_like(num))


# ------------------------------------------------------------------------------------------ dispatch


def trim_all(ds: list[Tensor], params: MethodParams) -> None:
    """TIES / magnitude step one, in place: trim each expert's delta to its density (a per-tensor top-k, or the
    global ``thresholds``)."""
    n = len(ds)
    density = params.density or (1.0,) * n
    thr = params.thresholds or (None,) * n
    for i, d in enumerate(ds):
        _trim_(d, density[i], thr[i], params.mergekit)


def dare_all(ds: list[Tensor], params: MethodParams, generator: torch.Generator | None, method: str) -> list[Tensor]:
    """DARE's step one: each expert's delta dropped at its rate and rescaled (:func:`dare`), from ``generator``."""
    if generator is None:
        raise PluribusError(f"method '{method}' is random: pass a seeded torch.Generator")
    drop = params.drop or (0.0,) * len(ds)
    return [dare(d, drop[i], generator, mergekit=params.mergekit) for i, d in enumerate(ds)]


def weighted_sum(ds: list[Tensor], params: MethodParams, *, stacked: bool = False) -> Tensor:
    """``lambda sum_t w_t d_t``, divided by ``sum_t w_t`` when ``params.normalize``; overwrites ``ds``.

    ``stacked``: over the stack ``[T, ...]`` (mergekit 0.1.5's ``GeneralizedTaskArithmeticMerge`` op for op), else
    expert by expert. Weights summing to 0 under normalize are refused (mergekit's mode divides by 1 there, as
    mergekit does)."""
    w = params.weights
    if params.normalize and not params.mergekit and abs(sum(w)) < 1e-8:
        raise PluribusError("merge weights sum to 0 and normalize divides by their sum; give weights with a non-zero "
                            "sum, or normalize: false")
    if stacked:
        stack = torch.stack(ds)
        wt = torch.tensor(w, dtype=stack.dtype).reshape(-1, *([1] * (stack.dim() - 1)))
        merged = (stack * wt).sum(dim=0)
        if params.normalize:
            divisor = wt.sum(dim=0)
            divisor[divisor.abs() < 1e-8] = 1
            merged /= divisor
        if params.lam != 1:
            merged *= params.lam
        return merged
    out = ds[0].mul_(w[0])  # ds are ours: the caller's (inplace) or fresh copies
    for d, wt_ in zip(ds[1:], w[1:], strict=True):
        out.add_(d, alpha=wt_)
    if params.normalize:
        out /= _nonzero(sum(w))
    return out.mul_(params.lam)


def ties_merge(ds: list[Tensor], params: MethodParams, *, stacked: bool = False) -> Tensor:
    """TIES steps two and three: :func:`elect_sign`, then :func:`disjoint_merge` (the weighted mean of the agreeing
    entries under ``params.normalize``, else their sum), times lambda; overwrites ``ds``.

    ``stacked``: over the stack ``[T, ...]``; else in one loop over the experts, whose memory is a few tensors of
    one expert's size."""
    normalize, w = bool(params.normalize), params.weights
    if stacked:
        stack = torch.stack(ds)
        wt = torch.tensor(w, dtype=stack.dtype)
        sign = elect_sign(stack, wt if params.mergekit else None, mergekit=params.mergekit)
        merged = disjoint_merge(stack, wt, sign, normalize, mergekit=params.mergekit)
        if params.lam != 1:
            merged *= params.lam
        return merged
    # elect_sign: mergekit weights first, then votes with the weighted deltas
    if params.mergekit:
        for d, wt_ in zip(ds, w, strict=True):
            d.mul_(wt_)
    total = ds[0].clone()
    for d in ds[1:]:
        total.add_(d)
    sign = torch.where(total >= 0, 1.0, -1.0).to(total.dtype) if params.mergekit else torch.sign(total)
    del total
    # disjoint_merge: the entries that agree with the elected sign (a zero never agrees: d * sign > 0)
    merged = torch.zeros_like(ds[0])
    divisor = torch.zeros_like(ds[0])
    for i, (d, wt_) in enumerate(zip(ds, w, strict=True)):
        a = d
        a.mul_(sign).clamp_(min=0)  # |d| where d agrees with the elected sign (d * sign > 0), else 0
        divisor.add_(a > 0, alpha=wt_)
        merged.add_(a, alpha=1.0 if params.mergekit else wt_)
        ds[i] = a = None  # type: ignore[call-overload]
    merged.mul_(sign)
    if normalize:
        if min(w) > 0:
            divisor.clamp_(min=min(w))  # 0 only where nothing agrees (merged is 0 there): one pass, not two
        else:
            divisor[divisor == 0] = 1
        merged /= divisor
    return merged.mul_(params.lam) if params.lam != 1 else merged


def _nonzero(x: float) -> float:
    return x if abs(x) >= 1e-8 else 1.0


# --------------------------------------------------------------------------- global trimming threshold


def global_threshold(chunks: Callable[[], Iterable[Tensor]], density: float) -> float:
    """The magnitude ``tau`` such that ``|x| >= tau`` keeps ``round(density n)`` entries over all chunks.

    Exact, in bounded memory: two passes over ``chunks()`` (a factory, called twice). Non-negative
    float32 values order like their bit patterns, so pass 1 counts the top 16 bits of ``|x|`` and finds
    the bucket holding the k-th largest; pass 2 collects only that bucket and selects inside it.
    """
    hist = torch.zeros(1 << 16, dtype=torch.int64)
    n = 0
    for c in chunks():
        bits = c.detach().float().abs().reshape(-1).view(torch.int32) >> 15
        hist += torch.bincount(bits, minlength=1 << 16)
        n += c.numel()
    k = keep_count(n, density)
    if k >= n:
        return 0.0
    if k == 0:
        return math.inf
    above = torch.flip(hist, [0]).cumsum(0)  # above[j]: entries in the top j+1 buckets
    j = int(torch.searchsorted(above, torch.tensor(k)).item())
    bucket = (1 << 16) - 1 - j
    rank_in_bucket = k - (int(above[j - 1]) if j > 0 else 0)
    vals = []
    for c in chunks():
        a = c.detach().float().abs().reshape(-1)
        vals.append(a[(a.view(torch.int32) >> 15) == bucket])
    inside = torch.sort(torch.cat(vals), descending=True).values
    return float(inside[rank_in_bucket - 1])


# ---------------------------------------------------------------------------------------- low rank


@dataclass(frozen=True)
class LowRank:
    """``delta ~= B @ A`` with B [d_out, k], A [k, d_in]; ``error`` = ||exact - B A||_F / ||exact||_F."""

    B: Tensor
    A: Tensor
    singular_values: Tensor
    error: float
    exact_norm: float


def rank_for_energy(s: Tensor, energy: float) -> int:
    """Smallest k with ``sum_{i<=k} s_i^2 >= energy * sum_i s_i^2`` (at least 1)."""
    e = s.double() ** 2
    total = float(e.sum())
    if total == 0:
        return 1
    cum = torch.cumsum(e, 0) / total
    return max(1, int(torch.searchsorted(cum, torch.tensor(energy, dtype=torch.float64) - 1e-12).item()) + 1)


def gram(x: Tensor) -> Tensor:
    """``x @ x.T``: the Gram product of :func:`truncate_factors` (merge.blas has a faster one for CPU merges)."""
    return x @ x.T


def truncate_factors(
    B: Tensor, A: Tensor, rank: int | None = None, energy: float | None = None, *, gram: Callable[[Tensor], Tensor] = gram
) -> LowRank:
    """Best rank-k approximation (Eckart-Young) of ``B @ A`` from its factors, never forming B @ A.

    B [d_out, R], A [R, d_in]. With the Cholesky factor of the R x R Gram matrix ``A A^T = R_a^T R_a``,
    ``A = R_a^T Q_a^T`` for an orthonormal ``Q_a``, so ``B A = C Q_a^T`` with ``C = B R_a^T`` and the SVD of the
    product is that of C: ``C^T C = R_a (B^T B) R_a^T = V S^2 V^T`` (a symmetric R x R eigenproblem, about twice
    as fast as an SVD of the core) and ``U = C V S^-1``. Keeping k triplets is optimal in Frobenius and spectral
    norm; the output splits ``S`` evenly: ``B' = B R_a^T V_k S_k^-1/2``, ``A' = S_k^1/2 V_k^T R_a^-T A``.
    Exactly one of ``rank`` / ``energy`` chooses k (capped at R). A rank-deficient or ill-conditioned A (or B,
    by symmetry) falls back to Householder QR of both factors and an SVD of the core ``R_b R_a^T``.
    Cost: O((d_out + d_in) R^2 + R^3), all BLAS-3. The decomposition runs in float64; the two final products
    that map the small R x k solution back to d_out and d_in run in the inputs' dtype, the one the output is
    stored in (for float32 factors this moves the result ~1e-7 relative, the size of storing it). ``gram(x)`` computes
    the float64 ``x @ x.T`` products (merge.blas.capped_gram gives a faster one on CPUs).
    """
    b64, a64 = B.to(torch.float64), A.to(torch.float64)
    low = _truncate_gram(b64, a64, rank, energy, B, A, gram)
    if low is None:  # (B A)^T = A^T B^T: the other side may be well conditioned
        low = _truncate_gram(a64.T, b64.T, rank, energy, A.T, B.T, gram)
        if low is not None:
            low = LowRank(low.A.T, low.B.T, low.singular_values, low.error, low.exact_norm)
    if low is None:
        low = _truncate_qr(b64, a64, rank, energy)
    return LowRank(low.B.to(B.dtype), low.A.to(A.dtype), low.singular_values, low.error, low.exact_norm)


def _kept(s: Tensor, rank: int | None, energy: float | None) -> tuple[int, float, float]:
    """(k, relative error of keeping k, exact Frobenius norm) from singular values sorted descending."""
    k = rank_for_energy(s, energy) if energy is not None else int(rank or s.numel())
    k = max(1, min(k, s.numel()))
    total = float((s**2).sum())
    tail = float((s[k:] ** 2).sum())
    return k, (math.sqrt(tail / total) if total > 0 else 0.0), math.sqrt(total)


def _truncate_gram(
    b64: Tensor, a64: Tensor, rank: int | None, energy: float | None, b_out: Tensor, a_out: Tensor,
    gram: Callable[[Tensor], Tensor],
) -> LowRank | None:
    """The eigh route of truncate_factors (final products with ``b_out``/``a_out``, the factors in their own
    dtype); None when A A^T is not safely positive definite."""
    chol, info = torch.linalg.cholesky_ex(gram(a64))
    if int(info) != 0:
        return None
    d = chol.diagonal()
    # cond(R_a) <~ 1e4 keeps Q_a orthonormal to ~1e-8 in float64; worse goes to QR
    if not bool(d.min() > 1e-4 * d.max()):
        return None
    ra_t = chol  # the lower-triangular Cholesky factor is R_a^T
    gram = ra_t.T @ gram(b64.T) @ ra_t
    lam, v = torch.linalg.eigh((gram + gram.T) * 0.5)
    lam, v = lam.flip(0).clamp_min(0), v.flip(1)
    s = lam.sqrt()
    k, err, norm = _kept(s, rank, energy)
    # S^-1/2 of a negligible singular value is noise: such a triplet contributes nothing and is written as zero
    inv_root = torch.where(s[:k] > 1e-7 * s[0], s[:k].clamp_min(1e-300).rsqrt(), torch.zeros_like(s[:k]))
    vk = v[:, :k]
    new_b = b_out @ (ra_t @ (vk * inv_root)).to(b_out.dtype)
    # A' = S^1/2 V_k^T L^-1 A: one triangular solve of the small R x k system
    y = torch.linalg.solve_triangular(ra_t.T, vk * (s[:k] * (inv_root > 0)).sqrt(), upper=True)
    new_a = y.T.to(a_out.dtype) @ a_out
    return LowRank(new_b, new_a, s[:k].to(torch.float32), err, norm)


def _truncate_qr(b64: Tensor, a64: Tensor, rank: int | None, energy: float | None) -> LowRank:
    """Householder QR of both factors, then an SVD of the R x R core ``R_b R_a^T`` (any conditioning)."""
    qb, rb = torch.linalg.qr(b64)
    qa, ra = torch.linalg.qr(a64.T)
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    k, err, norm = _kept(s, rank, energy)
    root = s[:k].sqrt()
    return LowRank((qb @ u[:, :k]) * root, root[:, None] * (vh[:k] @ qa.T), s[:k].to(torch.float32), err, norm)


def truncate_dense(delta: Tensor, rank: int | None = None, energy: float | None = None) -> LowRank:
    """Best rank-k approximation of a dense ``delta`` [d_out, d_in] by its SVD (for TIES/DARE results)."""
    u, s, vh = torch.linalg.svd(delta.to(torch.float64), full_matrices=False)
    k, err, norm = _kept(s, rank, energy)
    root = s[:k].sqrt()
    return LowRank((u[:, :k] * root).to(delta.dtype), (root[:, None] * vh[:k]).to(delta.dtype), s[:k].float(), err, norm)
