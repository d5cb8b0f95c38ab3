"""Spearman's rho and its permutation p-value, against values computed by hand."""

import math

import pytest

from opr.metrics.rank import ranks, spearman, spearman_test


def test_ranks_average_ties():
    assert ranks([10, 30, 20, 20]) == [1.0, 4.0, 2.5, 2.5]


def test_rho_without_ties():
    # rank differences 0, -1, 1, 0: rho = 1 - 6 * 2 / (4 * (16 - 1)) = 0.8
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert spearman([1, 2, 3, 4], [9, 7, 5, 1]) == pytest.approx(-1.0)


def test_rho_with_ties_is_pearson_of_mean_ranks():
    # ranks x = 1, 2.5, 2.5, 4; y = 1, 2, 3, 4: cov 4.5, var_x 4.5, var_y 5 -> 4.5 / sqrt(22.5)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(22.5))


def test_exact_permutation_p_value():
    # n = 4, rho = 1: of the 24 orderings only the identity (rho 1) and the reversal (rho -1) reach |rho| 1
    out = spearman_test([1, 2, 3, 4], [2, 4, 6, 8])
    assert out["rho"] == pytest.approx(1.0) and out["n"] == 4
    assert out["p"] == pytest.approx(2 / 24) and out["p_method"].startswith("exact")


def test_sampled_p_value_for_larger_n_is_small_for_a_perfect_order():
    out = spearman_test(list(range(12)), [v * v for v in range(12)], samples=2000)
    assert out["rho"] == pytest.approx(1.0)
    assert out["p"] < 0.01 and "random" in out["p_method"]


def test_constant_sample_and_bad_input():
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    assert math.isnan(spearman_test([1, 1, 1], [1, 2, 3])["p"])
    with pytest.raises(ValueError, match="differ in length"):
        spearman([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="at least 2"):
        spearman([1], [1])
