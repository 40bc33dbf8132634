"""Paired comparisons of runs: the numbers a protocol's reading rule reads (scipy.stats computes them).

    paired_test(differences)        -> n, mean, SE, 95% interval, one- and two-sided t-test p, sign-flip p
    detectable_effect(n, sd)        -> the smallest mean difference a one-sided paired t-test finds with 80% power

A difference per seed (same split and initial network) is one observation; seeds are independent.
"""
from __future__ import annotations

import itertools
from typing import Dict, Sequence

import numpy as np


def _scipy_stats():
    try:
        from scipy import stats
    except ImportError as e:  # a lent GPU's minimal environment: the summary is rebuilt where scipy is
        raise ImportError("paired statistics need scipy: pip install scipy") from e
    return stats


def sign_flip_p(differences: Sequence[float]) -> float:
    """Exact one-sided permutation p of mean > 0: the share of the 2^n sign patterns whose mean reaches the
    observed one (the observed pattern included). Up to 20 seeds."""
    d = np.asarray(differences, dtype=float)
    if not 1 <= len(d) <= 20:
        raise ValueError(f"sign_flip_p enumerates 2^n patterns: 1 to 20 differences, got {len(d)}")
    observed = d.mean()
    signs = np.array(list(itertools.product((1.0, -1.0), repeat=len(d))))
    return float(np.mean((signs * np.abs(d)).mean(1) >= observed - 1e-12))


def paired_test(differences: Sequence[float], confidence: float = 0.95) -> Dict[str, float]:
    """Mean, standard error, the two-sided `confidence` interval (Student t), the t-test's one-sided p (mean > 0)
    and two-sided p, and the exact sign-flip p, of per-seed paired differences."""
    d = np.asarray(differences, dtype=float)
    if len(d) < 2:
        raise ValueError(f"a paired test needs at least 2 seeds, got {len(d)}")
    if not np.isfinite(d).all():
        raise ValueError("a paired test needs finite differences; one is NaN or infinite")
    stats = _scipy_stats()
    n, mean, sd = len(d), d.mean(), d.std(ddof=1)
    se = sd / np.sqrt(n)
    half = stats.t.ppf(0.5 + confidence / 2, n - 1) * se
    if se > 0:
        t = mean / se
        greater, two_sided = stats.t.sf(t, n - 1), 2 * stats.t.sf(abs(t), n - 1)
    else:  # every seed the same difference: certain in its direction (or none at all)
        t = np.inf * np.sign(mean) if mean else 0.0
        greater, two_sided = (0.0 if mean > 0 else 1.0), (0.0 if mean else 1.0)
    return {"n": n, "mean": mean, "sd": sd, "se": se, "low": mean - half, "high": mean + half, "t": float(t),
            "p_greater": float(greater), "p_two_sided": float(two_sided), "p_sign_flip": sign_flip_p(d)}


def detectable_effect(n: int, sd: float, alpha: float = 0.05, power: float = 0.8) -> float:
    """The mean paired difference a one-sided paired t-test at `alpha` detects with `power` from n seeds whose
    differences have standard deviation sd (noncentral t)."""
    if n < 2 or sd <= 0:
        raise ValueError(f"detectable_effect needs n >= 2 and sd > 0, got n={n}, sd={sd}")
    stats = _scipy_stats()
    from scipy.optimize import brentq
    critical = stats.t.ppf(1 - alpha, n - 1)
    return brentq(lambda effect: stats.nct.sf(critical, n - 1, effect * np.sqrt(n) / sd) - power, 1e-9, 100 * sd)
