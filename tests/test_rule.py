"""The selection rule against hand computations (klora/rule.py)."""

import numpy as np
import pytest
import torch

from klora import rule


def test_topk_sum_matches_sorted_absolute_values():
    gen = torch.Generator().manual_seed(0)
    delta = torch.randn(37, 23, generator=gen)
    expected = np.sort(np.abs(delta.numpy()).ravel())[::-1][:64].sum()
    assert rule.topk_sum(delta, 64) == pytest.approx(float(expected), rel=1e-6)
    assert rule.topk_sum(delta, 10**6) == pytest.approx(float(np.abs(delta.numpy()).sum()), rel=1e-6)


def test_dense_delta_is_scaled_product_in_float32():
    A = torch.randn(4, 6, dtype=torch.float16)
    B = torch.randn(5, 4, dtype=torch.float16)
    d = rule.dense_delta(A, B, 0.5)
    assert d.dtype == torch.float32
    assert torch.allclose(d, 0.5 * B.float() @ A.float())


def test_layer_stats_use_product_of_ranks():
    c, s = torch.ones(3, 3), 2 * torch.ones(3, 3)
    stats = rule.layer_stats(c, s, content_rank=2, style_rank=3)
    assert stats.k == 6
    assert stats.content_topk_sum == 6.0 and stats.style_topk_sum == 12.0
    assert stats.ratio == pytest.approx(9.0 / 18.0)


def test_gamma_drops_ratios_at_three_times_the_mean_once():
    # mean 3.25, threshold 9.75: 10 goes, the rest average to 1.
    assert rule.gamma_from_ratios([1.0, 1.0, 1.0, 10.0]) == pytest.approx(1.0)
    # nothing reaches 3x the mean: plain mean
    assert rule.gamma_from_ratios([1.0, 2.0, 3.0]) == pytest.approx(2.0)
    # exactly 3x the mean is dropped (">=")
    ratios = [1.0, 1.0, 1.0, 9.0]  # mean 3, 9.0 >= 3 * 3
    assert rule.gamma_from_ratios(ratios) == pytest.approx(1.0)
    assert rule.gamma_from_ratios([]) == 1.0
    # zero, infinite and NaN ratios (layers with an all-zero side) never count: gamma is never 0, inf or NaN
    assert rule.gamma_from_ratios([0.0, 0.0, 3.0, float("inf"), float("nan")]) == pytest.approx(3.0)
    assert rule.gamma_from_ratios([0.0, float("inf")]) == 1.0


@pytest.mark.parametrize("pattern,p,expected", [
    ("s", 0.0, 0.5), ("s", 0.5, 1.25), ("s", 0.98, 1.97),
    ("s*", 0.0, 1.275), ("s*", 0.1, 1.425), ("s*", 0.2, 0.075), ("s*", 0.9, 1.125),
])
def test_scale_patterns_with_paper_defaults(pattern, p, expected):
    beta = rule.default_beta(pattern)
    assert rule.scale_at(p, pattern, 1.5, beta) == pytest.approx(expected)


def test_default_betas_and_bad_pattern():
    assert rule.default_beta("s") == 0.5
    assert rule.default_beta("s*") == pytest.approx(1.275)
    assert rule.default_beta("s*", alpha=2.0) == pytest.approx(1.7)
    with pytest.raises(ValueError, match="pattern"):
        rule.scale_at(0.0, "t", 1.5, 0.5)


def test_choice_compares_content_over_gamma_with_scaled_style():
    assert rule.prefers_content(10.0, 4.0, gamma=2.0, scale=1.0)       # 5 > 4
    assert not rule.prefers_content(10.0, 4.0, gamma=2.0, scale=1.25)  # 5 = 5 is not >
    assert not rule.prefers_content(10.0, 4.0, gamma=4.0, scale=1.0)   # 2.5 < 4


def test_vectorised_mask_equals_scalar_rule():
    gen = torch.Generator().manual_seed(1)
    c = torch.rand(200, generator=gen, dtype=torch.float64) * 3
    s = torch.rand(200, generator=gen, dtype=torch.float64) * 3
    for scale in (0.0, 0.3, 1.0, 1.9):
        mask = rule.content_mask(c, s, 1.3, scale).tolist()
        assert mask == [rule.prefers_content(float(a), float(b), 1.3, scale) for a, b in zip(c, s)]


@pytest.mark.parametrize("shape,k", [((300, 200), 64), ((50, 4000), 64), ((64, 64), 64), ((2000, 3), 16)])
def test_topk_sum_shortcut_is_exact_on_structured_matrices(shape, k):
    gen = torch.Generator().manual_seed(shape[0])
    cases = [torch.randn(*shape, generator=gen),
             torch.randn(shape[0], 2, generator=gen) @ torch.randn(2, shape[1], generator=gen)]
    concentrated = torch.randn(*shape, generator=gen) * 0.01
    concentrated[0] = 10.0  # every large value in one row, ties included
    cases.append(concentrated)
    cases.append(torch.ones(*shape))
    for delta in cases:
        expected = np.sort(np.abs(delta.numpy()).ravel())[::-1][:k].sum()
        assert rule.topk_sum(delta, k) == pytest.approx(float(expected), rel=1e-5)
