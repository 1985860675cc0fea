"""How sure an accuracy is: Wilson intervals for one system, exact McNemar tests for two on the same problems."""

from __future__ import annotations

import math


def wilson_interval(correct: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval of ``correct / n`` (95% by default); (0, 1) when ``n`` is 0.

    Unlike the normal approximation it stays inside [0, 1] and keeps its coverage at the small n and extreme
    accuracies of held-out sets of tens of problems.
    """
    if n <= 0:
        return 0.0, 1.0
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_exact(wins: int, losses: int) -> float:
    """Two-sided exact McNemar p-value from the discordant pairs of two systems on the same problems.

    ``wins``: problems only the first system solved; ``losses``: problems only the second solved. Under the
    null (equal accuracy) wins ~ Binomial(wins + losses, 1/2); the p-value is twice the smaller tail, capped at 1.
    """
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired(first: dict[str, bool], second: dict[str, bool]) -> tuple[int, int, int]:
    """(wins, losses, shared problems) of ``first`` over ``second`` on the problem ids both were scored on."""
    shared = first.keys() & second.keys()
    wins = sum(first[i] and not second[i] for i in shared)
    losses = sum(second[i] and not first[i] for i in shared)
    return wins, losses, len(shared)
