"""hdkdlib.stats against numbers computed by hand and by brute force."""
import itertools

import numpy as np
import pytest

from hdkdlib import stats


def test_paired_test_of_one_two_three_four_by_hand():
    """d = 1, 2, 3, 4: mean 2.5, sd sqrt(5/3), SE sd/2, t = 2.5/SE = 3.873 on 3 df; one-sided p 0.0152 and the 95%
    interval 2.5 -+ 3.1824 SE (t tables); the sign-flip p is 1/16 (only the observed signs reach the mean)."""
    r = stats.paired_test([1, 2, 3, 4])
    se = np.sqrt(5 / 3) / 2
    assert r["n"] == 4 and r["mean"] == 2.5 and r["se"] == pytest.approx(se)
    assert r["t"] == pytest.approx(2.5 / se)
    assert r["p_greater"] == pytest.approx(0.01522, abs=1e-4)
    assert r["p_two_sided"] == pytest.approx(2 * r["p_greater"])
    assert (r["low"], r["high"]) == pytest.approx((2.5 - 3.18245 * se, 2.5 + 3.18245 * se), abs=1e-4)
    assert r["p_sign_flip"] == 1 / 16


def test_sign_flip_p_against_brute_force():
    rng = np.random.default_rng(0)
    d = rng.normal(0.5, 1.0, 7)
    brute = np.mean([np.mean(np.array(s) * np.abs(d)) >= d.mean() - 1e-12
                     for s in itertools.product((1, -1), repeat=7)])
    assert stats.sign_flip_p(d) == pytest.approx(brute)
    assert stats.paired_test(-d)["p_greater"] == pytest.approx(1 - stats.paired_test(d)["p_greater"])


def test_detectable_effect_matches_the_protocols_power_table():
    """6 seeds, sd 1.5: 1.78 points (results/tin100-cpu-control/PROTOCOL.md); more seeds detect less."""
    assert stats.detectable_effect(6, 1.5) == pytest.approx(1.78, abs=0.01)
    assert stats.detectable_effect(10, 1.5) < stats.detectable_effect(6, 1.5)


def test_bad_input_says_what_is_wrong():
    with pytest.raises(ValueError, match="at least 2 seeds"):
        stats.paired_test([1.0])
    with pytest.raises(ValueError, match="finite"):
        stats.paired_test([1.0, float("nan")])
    with pytest.raises(ValueError, match="1 to 20"):
        stats.sign_flip_p(np.ones(21))
    r = stats.paired_test([1.0, 1.0, 1.0])  # no spread: certain, not a division by zero
    assert r["p_greater"] == 0.0 and r["se"] == 0.0
