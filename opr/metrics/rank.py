"""Spearman's rank correlation with a permutation p-value (pure Python; SciPy is not a dependency).

Used by ``opr.tools.analyze`` for "RL heals OOD forgetting" claim 4: across checkpoints, does the OOD score
follow the rotation of the singular subspaces more closely than the change of the singular values?
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence

__all__ = ["ranks", "spearman", "spearman_test"]

EXACT_UP_TO = 8  # n! = 40,320 permutations at n = 8; above that the p-value is estimated by sampling


def ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks of ``values`` (length n -> length n); tied values share the mean of their ranks."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def _pearson(x: Sequence[float], y: Sequence[float]) -> float:
    mx, my = sum(x) / len(x), sum(y) / len(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    if sxx == 0 or syy == 0:
        return math.nan  # one side is constant: no ordering to correlate
    return sxy / math.sqrt(sxx * syy)


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rho of two paired samples (length n >= 2 each): Pearson's r of their ranks (ties averaged).
    NaN when either sample is constant."""
    if len(x) != len(y):
        raise ValueError(f"spearman: the samples differ in length ({len(x)} vs {len(y)})")
    if len(x) < 2:
        raise ValueError(f"spearman: needs at least 2 pairs, got {len(x)}")
    return _pearson(ranks(x), ranks(y))


def spearman_test(x: Sequence[float], y: Sequence[float], samples: int = 20000, seed: int = 0) -> dict:
    """``{"rho", "n", "p", "p_method"}``: rho as :func:`spearman`; ``p`` the two-sided permutation p-value,
    the fraction of orderings of ``y`` whose ``|rho|`` reaches the observed ``|rho|`` (exact over all n! orderings for
    n <= 8, else ``samples`` random ones with the observed counted once: (hits + 1) / (samples + 1))."""
    rho = spearman(x, y)
    n = len(x)
    if math.isnan(rho):
        return {"rho": rho, "n": n, "p": math.nan, "p_method": "undefined (a constant sample)"}
    rx, ry = ranks(x), ranks(y)
    target = abs(rho) - 1e-12
    if n <= EXACT_UP_TO:
        perms = list(itertools.permutations(ry))
        hits = sum(abs(_pearson(rx, p)) >= target for p in perms)
        return {"rho": rho, "n": n, "p": hits / len(perms), "p_method": f"exact ({len(perms)} orderings)"}
    rng = random.Random(seed)
    shuffled = list(ry)
    hits = 0
    for _ in range(samples):
        rng.shuffle(shuffled)
        hits += abs(_pearson(rx, shuffled)) >= target
    return {"rho": rho, "n": n, "p": (hits + 1) / (samples + 1), "p_method": f"{samples} random orderings"}
