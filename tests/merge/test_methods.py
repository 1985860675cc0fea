"""Merge math: closed forms, hypothesis properties, and mergekit's own functions as the reference of its mode."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pluribus.errors import PluribusError
from pluribus.merge import methods as M
from pluribus.merge.registry import composed_merge, merge_deltas

SETTINGS = settings(max_examples=25, deadline=None)


def rand(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


shapes = st.tuples(st.integers(1, 12), st.integers(1, 12))
seeds = st.integers(0, 10_000)


@SETTINGS
@given(shapes, seeds, st.sampled_from(["task_arithmetic", "ties", "magnitude", "dare_linear", "dare_ties", "pcb"]))
def test_one_expert_weight_one_gives_it_back(shape, seed, method):
    d = rand(shape, seed)
    out = merge_deltas(method, [d], M.MethodParams(weights=(1.0,)), torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, d, rtol=0, atol=1e-7)


@SETTINGS
@given(shapes, seeds, st.lists(st.floats(0.1, 2.0), min_size=2, max_size=4), st.floats(0.1, 2.0))
def test_task_arithmetic_closed_form(shape, seed, weights, lam):
    ds = [rand(shape, seed + i) for i in range(len(weights))]
    out = merge_deltas("task_arithmetic", ds, M.MethodParams(weights=tuple(weights), lam=lam))
    expected = lam * sum(w * d for w, d in zip(weights, ds, strict=True))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


@SETTINGS
@given(shapes, seeds, st.integers(2, 4), st.booleans())
def test_ties_density_one_agreeing_signs_is_the_mean(shape, seed, n, mergekit):
    sign = torch.sign(rand(shape, seed)) + (rand(shape, seed) == 0).float()  # +-1 everywhere
    ds = [rand(shape, seed + 1 + i).abs().clamp_min(1e-3) * sign for i in range(n)]
    out = merge_deltas("ties", ds, M.MethodParams(weights=(1.0,) * n, density=(1.0,) * n, mergekit=mergekit))
    torch.testing.assert_close(out, torch.stack(ds).mean(0), rtol=1e-5, atol=1e-6)


def test_ties_follows_the_paper_on_a_worked_example():
    # column 0: mass +3 vs -1 -> keep the two positives, mean 1.5; column 1: trimmed to zero everywhere -> 0
    d1, d2, d3 = torch.tensor([[2.0, 0.01]]), torch.tensor([[1.0, -0.01]]), torch.tensor([[-1.0, 0.0]])
    out = merge_deltas("ties", [d1, d2, d3], M.MethodParams(weights=(1.0, 1.0, 1.0), density=(0.5, 0.5, 0.5)))
    torch.testing.assert_close(out, torch.tensor([[1.5, 0.0]]))


def test_ties_sign_vote_weighted_only_in_mergekit_mode():
    # unweighted mass: +1 - 2 = -1 -> negative wins; weighted (w=3, 1): +3 - 2 = +1 -> positive wins
    d = [torch.tensor([1.0]), torch.tensor([-2.0])]
    p = dict(weights=(3.0, 1.0), density=(1.0, 1.0))
    assert merge_deltas("ties", d, M.MethodParams(**p)).item() == pytest.approx(-2.0)
    assert merge_deltas("ties", d, M.MethodParams(**p, mergekit=True)).item() == pytest.approx(1.0)


@SETTINGS
@given(shapes, seeds)
def test_dare_p_zero_is_task_arithmetic(shape, seed):
    ds = [rand(shape, seed), rand(shape, seed + 1)]
    p = M.MethodParams(weights=(0.7, 0.3), drop=(0.0, 0.0))
    out = merge_deltas("dare_linear", ds, p, torch.Generator().manual_seed(seed))
    torch.testing.assert_close(out, merge_deltas("task_arithmetic", ds, p))


def test_dare_rescale_is_exact_and_its_mean_over_seeds_converges():
    d = rand((16, 16), 0)
    g = torch.Generator().manual_seed(0)
    one = M.dare(d, 0.75, g)
    kept = one != 0
    torch.testing.assert_close(one[kept], d[kept] * 4.0)  # exactly 1 / (1 - p)
    mean = torch.stack([M.dare(d, 0.75, g) for _ in range(3000)]).mean(0)
    # std of the mean: |d| sqrt(p / (1 - p)) / sqrt(3000) ~= 0.03 |d|; allow 5 sigma
    assert float(((mean - d).abs() / d.abs().clamp_min(1e-3)).median()) < 0.05
    assert float((mean - d).abs().max()) < 5 * float(d.abs().max()) * math.sqrt(3) / math.sqrt(3000)


def test_dare_is_seeded():
    d = rand((8, 8), 1)
    a = M.dare(d, 0.5, torch.Generator().manual_seed(3))
    b = M.dare(d, 0.5, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_dare_mergekit_mode_rescales_to_the_l1_norm():
    d = rand((32, 32), 2)
    out = M.dare(d, 0.6, torch.Generator().manual_seed(0), mergekit=True)
    assert float(out.abs().sum()) == pytest.approx(float(d.abs().sum()), rel=1e-5)


@SETTINGS
@given(st.integers(1, 400), st.floats(0.01, 1.0), seeds)
def test_magnitude_prune_keeps_the_largest(n, density, seed):
    d = rand((n,), seed)
    out = M.magnitude_prune(d, density)
    k = M.keep_count(n, density)
    assert int((out != 0).sum()) == k
    if 0 < k < n:
        assert float(out[out != 0].abs().min()) >= float(d[out == 0].abs().max())


@SETTINGS
@given(st.integers(1, 3000), st.floats(0.01, 1.0), seeds, st.booleans())
def test_magnitude_mergekit_mode_matches_mergekit_bit_for_bit(n, density, seed, coarse):
    from mergekit.sparsify import magnitude

    d = rand((n,), seed)
    if coarse:  # bf16 deltas tie a lot: the cut must follow mergekit's argsort
        d = (d * 4).round() / 4
    torch.testing.assert_close(M.magnitude_prune(d, density, mergekit=True), magnitude(d, density), rtol=0, atol=0)


@SETTINGS
@given(st.lists(st.integers(1, 500), min_size=1, max_size=5), st.floats(0.01, 0.99), seeds)
def test_global_threshold_is_the_kth_largest_over_all_chunks(sizes, density, seed):
    chunks = [rand((s,), seed + i) for i, s in enumerate(sizes)]
    allv = torch.cat(chunks).abs()
    k = M.keep_count(allv.numel(), density)
    tau = M.global_threshold(lambda: iter(chunks), density)
    assert int((allv >= tau).sum()) == k  # random floats: no ties
    if 0 < k < allv.numel():
        assert tau == float(torch.sort(allv, descending=True).values[k - 1])


@SETTINGS
@given(st.integers(1, 40), st.integers(1, 40), st.lists(st.integers(1, 6), min_size=1, max_size=4), st.integers(1, 8), seeds)
def test_truncate_factors_is_the_best_rank_k(d_out, d_in, ranks, k, seed):
    bs = [rand((d_out, r), seed + i) for i, r in enumerate(ranks)]
    as_ = [rand((r, d_in), seed + 100 + i) for i, r in enumerate(ranks)]
    B, A = torch.cat(bs, 1).double(), torch.cat(as_, 0).double()
    exact = B @ A
    low = M.truncate_factors(B, A, rank=k)
    u, s, vh = torch.linalg.svd(exact, full_matrices=False)
    kk = min(k, sum(ranks), min(d_out, d_in))
    best = (u[:, :kk] * s[:kk]) @ vh[:kk]
    got = low.B @ low.A
    torch.testing.assert_close(got, best, rtol=1e-6, atol=1e-8 * float(s[0]))
    actual = float(torch.linalg.matrix_norm(exact - got) / torch.linalg.matrix_norm(exact))
    assert low.error == pytest.approx(actual, abs=1e-6)


def test_truncate_factors_full_rank_is_exact_and_energy_picks_the_smallest_rank():
    B, A = rand((30, 6), 0).double(), rand((6, 20), 1).double()
    low = M.truncate_factors(B, A, rank=6)
    torch.testing.assert_close(low.B @ low.A, B @ A)
    assert low.error < 1e-7
    s = torch.linalg.svdvals(B @ A)
    for energy in (0.5, 0.9, 0.99, 1.0):
        k = M.truncate_factors(B, A, energy=energy).A.shape[0]
        frac = (s[:k] ** 2).sum() / (s**2).sum()
        assert frac >= energy - 1e-9 and (k == 1 or (s[: k - 1] ** 2).sum() / (s**2).sum() < energy)


def test_linear_is_the_weighted_average():
    a, b = rand((4, 4), 0), rand((4, 4), 1)
    torch.testing.assert_close(M.linear([a, b], [1.0, 3.0]), (a + 3 * b) / 4)
    with pytest.raises(PluribusError, match="sum to 0"):
        M.linear([a, b], [1.0, -1.0])


def test_bad_inputs_are_named():
    with pytest.raises(PluribusError, match=r"^Unknown merge method 'tie'\. Available: cat, svd, linear, task_arithmetic"):
        merge_deltas("tie", [torch.ones(2)], M.MethodParams(weights=(1.0,)))
    with pytest.raises(PluribusError, match=r"method 'cat' merges LoRA factors"):
        merge_deltas("cat", [torch.ones(2)], M.MethodParams(weights=(1.0,)))
    with pytest.raises(PluribusError, match="merge weights sum to 0 and normalize divides by their sum"):
        merge_deltas("task_arithmetic", [torch.ones(2)] * 2, M.MethodParams(weights=(1.0, -1.0), normalize=True))
    with pytest.raises(PluribusError, match="pass a seeded torch.Generator"):
        merge_deltas("dare_ties", [torch.ones(2)], M.MethodParams(weights=(1.0,), drop=(0.5,)))
    with pytest.raises(PluribusError, match=r"tensor 'expert1:layer\.w' holds 1 NaN/Inf"):
        M.check_finite(torch.tensor([1.0, float("nan")]), "expert1:layer.w")
    with pytest.raises(PluribusError, match="holds 1 NaN/Inf"):
        M.check_finite(torch.tensor([1.0, float("inf")]), "x")
    M.check_finite(torch.full((4,), 3e38), "large but finite")  # the sum overflows; the exact check passes
    with pytest.raises(PluribusError, match=r"density = 1.5 is out of range"):
        M.check_fraction(1.5, "density")


@pytest.mark.parametrize("case", ["duplicate", "zero_b", "ill_conditioned", "wide"])
def test_truncate_factors_stays_the_best_rank_k_on_degenerate_stacks(case):
    # each case takes a different route: eigh with A's Cholesky, the transposed problem, or QR + SVD
    b1, a1 = rand((50, 8), 0).double(), rand((8, 40), 1).double()
    if case == "duplicate":  # the same adapter twice: A_cat and B_cat are rank-deficient
        B, A = torch.cat([b1, 2 * b1], 1), torch.cat([a1, a1], 0)
    elif case == "zero_b":  # a freshly initialised adapter (B = 0) stacked with a trained one
        B, A = torch.cat([b1, torch.zeros(50, 4, dtype=torch.float64)], 1), torch.cat([a1, rand((4, 40), 2).double()], 0)
    elif case == "ill_conditioned":  # rows of A scaled over 10 orders of magnitude
        B, A = b1, a1 * torch.logspace(-5, 5, 8, dtype=torch.float64)[:, None]
    else:  # R larger than d_in: A A^T is singular
        B, A = rand((50, 12), 3).double(), rand((12, 6), 4).double()
    exact = B @ A
    u, s, vh = torch.linalg.svd(exact, full_matrices=False)
    for k in (1, 3, 6):
        low = M.truncate_factors(B, A, rank=k)
        best = (u[:, :k] * s[:k]) @ vh[:k]
        torch.testing.assert_close(low.B @ low.A, best, rtol=1e-6, atol=1e-7 * float(s[0]))
        assert torch.isfinite(low.B).all() and torch.isfinite(low.A).all()
        actual = float(torch.linalg.matrix_norm(exact - low.B @ low.A) / torch.linalg.matrix_norm(exact))
        assert low.error == pytest.approx(actual, abs=1e-6)


def test_float32_factors_stay_within_storage_precision_of_the_float64_result():
    B, A = rand((300, 40), 5), rand((40, 200), 6)
    low32, low64 = M.truncate_factors(B, A, rank=16), M.truncate_factors(B.double(), A.double(), rank=16)
    assert low32.B.dtype == low32.A.dtype == torch.float32
    p32, p64 = low32.B.double() @ low32.A.double(), low64.B @ low64.A
    assert float(torch.linalg.matrix_norm(p32 - p64) / torch.linalg.matrix_norm(p64)) < 1e-6
    assert low32.error == low64.error  # the error comes from the float64 decomposition


def test_non_finite_weights_lambda_and_fractions_are_refused():
    with pytest.raises(PluribusError, match=r"weight must be a finite number \(got nan\)"):
        M.MethodParams(weights=(1.0, float("nan")))
    with pytest.raises(PluribusError, match=r"lambda must be a finite number \(got inf\)"):
        M.MethodParams(weights=(1.0,), lam=float("inf"))
    with pytest.raises(PluribusError, match=r"energy must be a finite number \(got nan\)"):
        M.check_fraction(float("nan"), "energy")


# ---------------------------------------------------------------------------------------------- PCB


def pcb_paper(taus: list[torch.Tensor], r: float, lam: float = 1.0, weights: list[float] | None = None) -> torch.Tensor:
    """PCB-Merging as the paper writes it (arXiv:2410.02396, Sec. 3), step by step, in float64; ``weights`` scale
    each task vector in the numerator (all ones: the paper)."""
    n, d = len(taus), taus[0].numel()
    flat = [t.double().reshape(-1) for t in taus]

    def norm(x):  # min-max over the tensor's entries; a constant tensor (0 / 0) maps to zeros, pluribus's convention
        return (x - x.min()) / (x.max() - x.min()) if x.max() > x.min() else torch.zeros_like(x)

    beta_hat = []
    for ti in flat:
        intra = torch.softmax(n * norm(ti * ti), dim=0)
        inter = sum(torch.softmax(norm(ti * tj), dim=0) for tj in flat)
        beta = intra * inter
        k = round(r * d)  # top r fraction: sorted ascending, from index (1 - r) D
        m = beta >= torch.sort(beta).values[d - k] if k else torch.zeros(d, dtype=torch.bool)
        m &= ti != 0  # pluribus's one addition (M.pcb's docstring): an exact zero of tau_i is never kept
        beta_hat.append(m * beta)
    ws = weights or [1.0] * n
    num = sum(b * w * t for b, w, t in zip(beta_hat, ws, flat, strict=True))
    den = sum(beta_hat)
    return (lam * torch.where(den > 0, num / den, 0.0)).reshape(taus[0].shape)


@SETTINGS
@given(shapes, seeds, st.integers(2, 5), st.sampled_from([1.0, 0.7, 0.3, 0.1]), st.floats(0.5, 2.0))
@example((8, 10), 2029, 2, 1.0, 2.0)  # a cancelling entry (below)
def test_pcb_follows_the_paper_step_by_step(shape, seed, n, density, lam):
    taus = [rand(shape, seed + i).double() for i in range(n)]
    got = merge_deltas("pcb", taus, M.MethodParams(weights=(1.0,) * n, density=(density,) * n, lam=lam))
    torch.testing.assert_close(got, pcb_paper(taus, density, lam), rtol=1e-12, atol=1e-12)
    # float32 inputs compute in float32: within its rounding of the same formula. An entry is a beta-weighted mean
    # of the task vectors' entries, so where their signs differ it cancels: its error is a few float32 eps of
    # lam * max |tau|, not of itself (seed 2029, n=2, lam=2: 1.7e-6 off -0.61 from entries 1.66 and -1.75)
    got32 = M.pcb([t.float() for t in taus], density, lam=lam)
    assert got32.dtype == torch.float32
    scale = lam * max(float(t.abs().max()) for t in taus)
    torch.testing.assert_close(got32.double(), pcb_paper(taus, density, lam), rtol=1e-5,
                               atol=16 * torch.finfo(torch.float32).eps * scale)


def test_pcb_worked_example_by_hand():
    # two tasks, two entries: Norm(t1^2) = [0, 1], Norm(t2^2) = [1, 0]; t1 t2 = [2, 2] is constant -> Norm = [0, 0]
    # -> Softmax = [1/2, 1/2]
    t1, t2 = torch.tensor([1.0, 2.0], dtype=torch.float64), torch.tensor([2.0, 1.0], dtype=torch.float64)
    e2 = math.exp(2)  # N = 2
    intra1 = torch.tensor([1, e2]) / (1 + e2)
    intra2 = torch.tensor([e2, 1]) / (1 + e2)
    self1 = torch.tensor([1, math.e]) / (1 + math.e)  # Softmax(Norm(t1 t1)) = Softmax([0, 1])
    self2 = torch.tensor([math.e, 1]) / (1 + math.e)
    beta1 = intra1 * (self1 + 0.5)
    beta2 = intra2 * (self2 + 0.5)
    dense = (beta1 * t1 + beta2 * t2) / (beta1 + beta2)
    torch.testing.assert_close(M.pcb([t1, t2], 1.0), dense.double())
    # density 0.5 keeps one entry per task: task 1 its second, task 2 its first -> each entry from one task alone
    torch.testing.assert_close(M.pcb([t1, t2], 0.5), torch.tensor([2.0, 2.0], dtype=torch.float64))


def test_pcb_edge_cases():
    d = rand((6, 5), 3)
    # one task, density 1: beta cancels in beta tau / beta -> the task vector itself (then lambda)
    torch.testing.assert_close(M.pcb([d], 1.0), d, rtol=1e-6, atol=0)
    torch.testing.assert_close(M.pcb([d], 1.0, lam=0.5), 0.5 * d, rtol=1e-6, atol=0)
    # one task, density r: beta is increasing in |tau|, so the top-r |tau| survive unchanged (magnitude pruning)
    torch.testing.assert_close(M.pcb([d], 0.3), M.magnitude_prune(d, 0.3), rtol=1e-6, atol=0)
    # density 1, two equal tasks: the balanced mean of equal vectors is that vector
    torch.testing.assert_close(M.pcb([d, d.clone()], 1.0), d, rtol=1e-6, atol=1e-7)
    # an all-zero task vector (an expert equal to the base, or a module an adapter lacks) never pulls toward 0
    zero = torch.zeros_like(d)
    torch.testing.assert_close(M.pcb([d, zero], 1.0), d, rtol=1e-6, atol=0)
    torch.testing.assert_close(M.pcb([d, zero], 0.4), M.pcb([d], 0.4), rtol=1e-6, atol=0)
    assert torch.equal(M.pcb([zero, zero], 0.5), zero)
    # weights scale each task vector in the numerator: all ones is the paper, 2 doubles a lone task
    torch.testing.assert_close(M.pcb([d], 1.0, weights=[2.0]), 2 * d, rtol=1e-6, atol=0)
    # a single entry, and an empty tensor
    torch.testing.assert_close(M.pcb([torch.tensor([3.0]), torch.tensor([1.0])], 1.0).sum(), torch.tensor(2.0))
    assert M.pcb([torch.zeros(0, 4)], 0.5).shape == (0, 4)


def test_pcb_many_tasks_do_not_underflow_in_float32():
    # exp(-N) of the intra softmax underflows float32 past N ~ 87: the log-space weights keep the formula
    taus = [rand((4, 4), 500 + i) for i in range(120)]
    got = M.pcb(taus, 1.0)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), pcb_paper([t.double() for t in taus], 1.0), rtol=1e-4, atol=1e-6)


def test_pcb_bad_parameters_are_named():
    d = [rand((3, 3), 0), rand((3, 3), 1)]
    with pytest.raises(PluribusError, match=r"pcb density = 0.0 is out of range"):
        M.pcb(d, 0.0)
    with pytest.raises(PluribusError, match="pcb got 2 task vectors but 3 densities"):
        M.pcb(d, [0.5, 0.5, 0.5])
    with pytest.raises(PluribusError, match="'pcb' has no mergekit counterpart"):
        merge_deltas("pcb", d, M.MethodParams(weights=(1.0, 1.0), mergekit=True))


# ------------------------------------------------------- the lean loop against the steps composed


@pytest.mark.parametrize("method", ["task_arithmetic", "magnitude", "ties", "dare_linear", "dare_ties"])
@pytest.mark.parametrize("mergekit", [False, True])
@pytest.mark.parametrize("normalize", [None, True, False])
@pytest.mark.parametrize("weights", [(1.0, 0.5, 2.0), (1.0, -0.7, 0.3)])
def test_the_lean_loop_is_the_composed_merge(method, mergekit, normalize, weights):
    ds = [rand((37, 53), s) for s in range(3)]
    p = M.MethodParams(weights=weights, density=(0.3, 0.5, 0.8), drop=(0.2, 0.5, 0.1), lam=0.7, normalize=normalize,
                       mergekit=mergekit)
    fast = merge_deltas(method, ds, p, torch.Generator().manual_seed(1))
    ref = composed_merge(method, ds, p, torch.Generator().manual_seed(1))
    torch.testing.assert_close(fast, ref, rtol=1e-6, atol=1e-7)
    # in float64 too, and with global trimming thresholds
    ds64 = [d.double() for d in ds]
    p = M.MethodParams(weights=weights, density=(0.3, 0.5, 0.8), drop=(0.2, 0.5, 0.1), normalize=normalize,
                       mergekit=mergekit, thresholds=(0.5, 1.0, 0.2) if method in ("ties", "magnitude") else None)
    torch.testing.assert_close(merge_deltas(method, ds64, p, torch.Generator().manual_seed(2)),
                               composed_merge(method, ds64, p, torch.Generator().manual_seed(2)),
                               rtol=1e-12, atol=1e-14)


def test_composed_ties_is_peft_ties_on_unit_weights():
    from peft.utils.merge_utils import ties

    ds = [rand((37, 50), s) for s in range(3)]  # 1850 entries: density 0.4 keeps 740 exactly in both
    p = M.MethodParams(weights=(1.0,) * 3, density=(0.4,) * 3)
    torch.testing.assert_close(composed_merge("ties", ds, p), ties(ds, torch.ones(3), 0.4), rtol=1e-6, atol=1e-7)


def test_global_thresholds_apply_in_mergekit_half_precision_too():
    # the half-precision path of mergekit's mode used to trim each tensor on its own, ignoring the thresholds
    ds = [rand((40, 30), s).bfloat16() for s in range(2)]
    glob = M.MethodParams(weights=(1.0, 1.0), density=(0.5, 0.5), thresholds=(1.5, 1.5), mergekit=True)
    out = merge_deltas("ties", ds, glob)
    kept = [d.float().abs() >= 1.5 for d in ds]
    assert torch.equal(out != 0, (kept[0] | kept[1]) & (out != 0))  # nothing below the threshold survives
    assert torch.equal(out, composed_merge("ties", ds, glob))
    assert not torch.equal(out, merge_deltas("ties", ds, M.MethodParams(weights=(1.0, 1.0), density=(0.5, 0.5),
                                                                          mergekit=True)))
