"""The statistics of the report, with no SciPy: mean and sample std, Student's t (exact CDF, quantile by
bisection), the paired-t interval, the detectable difference at a given power and the sign-flip permutation
p-value."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

CONFIDENCE = 0.95


def mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    """(mean, sample std with ddof=1 or 0.0 for a single value, n); ``values`` must not be empty. The 0.0 of
    n = 1 is for plots (no error bar); the table and the CSV show the undefined spread as n/a / empty."""
    if not values:
        raise ValueError("mean_std of no values")
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std, len(values)


def student_t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with ``df`` (a positive integer) degrees of freedom, exactly: with
    theta = atan(t / sqrt(df)) and c = cos(theta)^2, ``P(|T| <= |t|)`` is
    (2/pi) * (theta + sin(theta) cos(theta) * (1 + 2/3 c + 2*4/(3*5) c^2 + ...)) for odd df (the bracket's sum
    has (df-1)/2 terms, none for df = 1) and sin(theta) * (1 + 1/2 c + 1*3/(2*4) c^2 + ...) with df/2 terms for
    even df (Abramowitz & Stegun 26.7.3-4)."""
    if df < 1 or int(df) != df:
        raise ValueError(f"degrees of freedom must be a positive integer, got {df}")
    df = int(df)
    theta = math.atan(abs(t) / math.sqrt(df))
    c = math.cos(theta) ** 2
    term, total = 1.0, 1.0
    if df % 2 == 1:
        for k in range(1, (df - 1) // 2):
            term *= c * (2 * k) / (2 * k + 1)
            total += term
        inside = 2.0 / math.pi * (theta + (math.sin(theta) * math.cos(theta) * total if df > 1 else 0.0))
    else:
        for k in range(1, df // 2):
            term *= c * (2 * k - 1) / (2 * k)
            total += term
        inside = math.sin(theta) * total
    return 0.5 + math.copysign(0.5 * inside, t)


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with ``df`` degrees of freedom: :func:`student_t_cdf` inverted by
    bisection to a relative precision of ~1e-12 (``t_quantile(0.975, 4)`` = 2.776...)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must lie in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    low, high = 0.0, 1.0
    while student_t_cdf(high, df) < p:
        low, high = high, 2.0 * high
    while high - low > 1e-12 * high:
        mid = 0.5 * (low + high)
        if student_t_cdf(mid, df) < p:
            low = mid
        else:
            high = mid
    return 0.5 * (low + high)


@dataclass(frozen=True)
class PairedDifference:
    """Mean of n paired differences (cell − reference) and its two-sided paired-t confidence interval
    (``low``/``high`` are ``None`` for n < 2; everything but n is ``None`` for n = 0); ``values``: the
    differences themselves (for :attr:`detectable` and :attr:`permutation_p`)."""

    n: int
    mean: float | None
    low: float | None = None
    high: float | None = None
    values: tuple[float, ...] = field(default=(), compare=False, repr=False)

    @property
    def detectable(self) -> float | None:
        """The smallest difference this design detects with 80% power (:func:`detectable_difference` of n and
        the differences' sample std); None for n < 2."""
        if len(self.values) < 2:
            return None
        return detectable_difference(len(self.values), statistics.stdev(self.values))

    @property
    def permutation_p(self) -> float | None:
        """The two-sided sign-flip permutation p-value of the mean (:func:`sign_flip_p`); None for n = 0."""
        return sign_flip_p(self.values) if self.values else None

    def text(self) -> str:
        """``mean [low, high]``; ``mean [n/a]`` without an interval; ``n/a`` without pairs."""
        if self.mean is None:
            return "n/a"
        if self.low is None or self.high is None:
            return f"{self.mean:.2f} [n/a]"
        return f"{self.mean:.2f} [{self.low:.2f}, {self.high:.2f}]"


def paired_difference(cell_values: Sequence[float], reference_values: Sequence[float],
                      confidence: float = CONFIDENCE) -> PairedDifference:
    """Paired t for ``cell_values[i]`` − ``reference_values[i]`` (same seed i): the mean difference and
    mean ± t_{(1+confidence)/2, n−1} · sd / sqrt(n), sd the sample std (ddof=1) of the differences."""
    if len(cell_values) != len(reference_values):
        raise ValueError("paired values must come in pairs")
    diffs = [float(a) - float(b) for a, b in zip(cell_values, reference_values)]
    n = len(diffs)
    if n == 0:
        return PairedDifference(0, None)
    mean = statistics.fmean(diffs)
    if n < 2:
        return PairedDifference(n, mean, values=tuple(diffs))
    half = t_quantile(0.5 + confidence / 2, n - 1) * statistics.stdev(diffs) / math.sqrt(n)
    return PairedDifference(n, mean, mean - half, mean + half, values=tuple(diffs))


POWER = 0.80  # the power of the detectable difference (--power)


ALPHA = 0.05  # its two-sided significance level


EXACT_SIGN_FLIPS = 20  # up to this many pairs the permutation p enumerates all 2^n sign flips


SAMPLED_SIGN_FLIPS = 2**20  # beyond it: this many random sign flips (fixed seed)


def detectable_difference(n: int, sd: float, power: float = POWER, alpha: float = ALPHA) -> float:
    """The smallest true mean difference that a two-sided paired t-test at level ``alpha`` on ``n`` pairs
    detects with probability ``power``, given the paired differences' standard deviation ``sd``:

        (t_{1−alpha/2, n−1} + t_{power, n−1}) · sd / √n

    This is the normal approximation (z_{1−alpha/2} + z_{power}) · sd / √n with t quantiles in place of the
    normal ones, not the exact noncentral-t solution (SciPy, which has the noncentral t, is not a dependency).
    Against the exact solution (the noncentral t's CDF integrated numerically; ``tests/test_report.py`` checks
    these figures) the approximation gives, at 80% power and alpha 0.05: n = 20 and 30: within 0.02%; n = 10:
    0.1% smaller; n = 5: 1.2% smaller (its true power 79.1%); n = 3: 5% smaller (76.6%); n = 2: 14% smaller
    (73.1%). So with fewer than 5 pairs the true detectable difference is somewhat larger than printed. ``sd``
    is the observed sample std (ddof=1): an estimate, itself uncertain with few pairs."""
    if n < 2:
        raise ValueError(f"a detectable difference needs n >= 2 pairs, got {n}")
    if not 0.0 < power < 1.0 or not 0.0 < alpha < 1.0:
        raise ValueError(f"power and alpha must lie in (0, 1), got power={power}, alpha={alpha}")
    return (t_quantile(1.0 - alpha / 2, n - 1) + t_quantile(power, n - 1)) * sd / math.sqrt(n)


def sign_flip_p(diffs: Sequence[float], exact_up_to: int = EXACT_SIGN_FLIPS,
                samples: int = SAMPLED_SIGN_FLIPS, seed: int = 0) -> float:
    """Two-sided sign-flip permutation p-value of the mean paired difference: under the null hypothesis
    (no difference, each difference symmetric about 0) every sign pattern of the differences is equally
    likely; p = the fraction of the 2^n patterns whose ``|mean|`` is at least the observed ``|mean|`` (ties count, with
    a relative tolerance of 1e-9 for rounding). No distributional assumption beyond the symmetry. Exact
    enumeration for n <= ``exact_up_to`` (vectorised in chunks of 2^16 patterns; 2^20 patterns take about a
    second); beyond it ``samples`` random sign patterns (``seed``), p = (1 + hits) / (1 + samples). The smallest
    possible p is 2 / 2^n: with 5 pairs 0.0625, so p < 0.05 needs at least 6 pairs. E.g. differences [1, 2, 3]:
    pattern sums ±1 ±2 ±3 reach ``|6|`` twice of 8, p = 0.25."""
    import numpy as np

    d = np.asarray([float(x) for x in diffs], dtype=np.float64)
    n = len(d)
    if n == 0:
        raise ValueError("a permutation p-value needs at least one paired difference")
    observed = abs(float(d.sum()))
    bar = observed - 1e-9 * max(1.0, observed)
    if n <= exact_up_to:
        hits, chunk = 0, 1 << 16
        powers = 1 << np.arange(n, dtype=np.int64)
        for start in range(0, 1 << n, chunk):
            codes = np.arange(start, min(start + chunk, 1 << n), dtype=np.int64)
            signs = np.where((codes[:, None] & powers) != 0, -1.0, 1.0)  # one sign pattern per row
            hits += int(np.count_nonzero(np.abs(signs @ d) >= bar))
        return hits / float(1 << n)
    rng = np.random.default_rng(seed)
    hits = 0
    for start in range(0, samples, 1 << 16):
        rows = min(1 << 16, samples - start)
        signs = rng.choice(np.array([-1.0, 1.0]), size=(rows, n))
        hits += int(np.count_nonzero(np.abs(signs @ d) >= bar))
    return (1 + hits) / (1 + samples)
