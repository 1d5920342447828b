"""The release gate's statistics: Wilson intervals for rates, the smallest margin a sample can
resolve, and McNemar's exact test for a change on the same examples.

Pure functions over counts (no torch, no I/O), so the gate's decisions are testable by hand.
"""

from __future__ import annotations

import math
from statistics import NormalDist

MAX_N = 10**8  # beyond this the sample size needed is reported as "more than"


def z_score(confidence: float) -> float:
    """The two-sided normal quantile of `confidence` (1.959964 at 0.95)."""
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson_rate(rate: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of an observed `rate` on `n` examples."""
    if n <= 0:
        return 0.0, 1.0
    z = z_score(confidence)
    z2 = z * z
    denominator = 1 + z2 / n
    centre = (rate + z2 / (2 * n)) / denominator
    half = z * math.sqrt(max(rate * (1 - rate), 0.0) / n + z2 / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def wilson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of `k` successes in `n` trials."""
    return wilson_rate(k / n if n else 0.0, n, confidence)


def passes(k: int, n: int, low: float | None, high: float | None, confidence: float) -> bool:
    """Whether `k` of `n` clears the bounds by its interval: its lower end at or above `low`,
    its upper end at or below `high`."""
    lo, hi = wilson(k, n, confidence)
    return (low is None or lo >= low - 1e-12) and (high is None or hi <= high + 1e-12)


def min_detectable(n: int, low: float | None, high: float | None, confidence: float) -> float | None:
    """How far from its threshold an observed rate must be to pass on `n` examples (the largest
    over the bounds given); None when no outcome on `n` examples passes."""
    margins = []
    if low is not None:  # (a linear scan: release evals are thousands of examples at most)
        k = next((k for k in range(n + 1) if passes(k, n, low, None, confidence)), None)
        margins.append(None if k is None else max(0.0, k / n - low))
    if high is not None:
        k = next((k for k in range(n, -1, -1) if passes(k, n, None, high, confidence)), None)
        margins.append(None if k is None else max(0.0, high - k / n))
    if any(m is None for m in margins):
        return None
    return max(margins) if margins else 0.0


def _resolves(n: int, low: float | None, high: float | None, margin: float | None, confidence: float) -> bool:
    """Whether `n` examples can pass: with a margin, a rate `margin` inside every bound passes;
    without one, some outcome passes."""
    if margin is None:  # the best outcomes: all n for a min, none for a max (the bounds move monotonically in k)
        if low is not None and high is not None and n <= 100_000:
            return min_detectable(n, low, high, confidence) is not None
        return ((low is None or passes(n, n, low, None, confidence))
                and (high is None or passes(0, n, None, high, confidence)))
    lo_needed, hi_needed = (low + margin if low is not None else 0.0), (high - margin if high is not None else 1.0)
    if lo_needed > hi_needed or lo_needed > 1 or hi_needed < 0:
        return False
    rate = min(max(lo_needed, 0.0), 1.0) if low is not None else max(min(hi_needed, 1.0), 0.0)
    lo, hi = wilson_rate(rate, n, confidence)
    return (low is None or lo >= low) and (high is None or hi <= high)


def needed_n(low: float | None, high: float | None, margin: float | None, confidence: float) -> int | None:
    """The smallest sample size that resolves the bounds (see `_resolves`); None if none does."""
    if not _resolves(MAX_N, low, high, margin, confidence):
        return None
    lo, hi = 1, MAX_N
    while lo < hi:  # resolving is monotone in n up to the granularity of k/n: search, then step down
        mid = (lo + hi) // 2
        if _resolves(mid, low, high, margin, confidence):
            hi = mid
        else:
            lo = mid + 1
    while lo > 1 and _resolves(lo - 1, low, high, margin, confidence):
        lo -= 1
    return lo


def unresolvable(check: str, n: int, low: float | None, high: float | None, margin: float | None,
                 confidence: float) -> str | None:
    """One line saying why `n` examples cannot decide `check`, naming the n it needs; None if they can."""
    if _resolves(n, low, high, margin, confidence):
        return None
    bounds = " ".join(f"{name} {value}" for name, value in (("min", low), ("max", high)) if value is not None)
    how = f"a rate {margin} inside {bounds}" if margin is not None else f"any outcome under {bounds}"
    needed = needed_n(low, high, margin, confidence)
    need = f"needs n >= {needed}" if needed else "no sample size can"
    return (f"{check}: n={n} cannot resolve {bounds} at {confidence:.0%} confidence "
            f"(for {how} to pass, {need})")


def binomial_cdf_half(k: int, n: int) -> float:
    """P(X <= k) for X ~ Binomial(n, 1/2)."""
    return sum(math.comb(n, i) for i in range(k + 1)) / 2**n


def mcnemar_exact(worse: int, better: int) -> float:
    """Two-sided exact McNemar p-value from the discordant pairs (a binomial test at 1/2)."""
    discordant = worse + better
    if discordant == 0:
        return 1.0
    return min(1.0, 2 * binomial_cdf_half(min(worse, better), discordant))


def paired_min_detectable(n: int, alpha: float) -> float | None:
    """The smallest rate difference McNemar can call significant on `n` pairs (every discordant
    pair one way); None when even n of n one way is not."""
    for m in range(1, n + 1):
        if mcnemar_exact(m, 0) < alpha:
            return m / n
    return None


def compare(baseline: list[int], current: list[int], higher_is_better: bool, alpha: float) -> dict[str, object]:
    """McNemar's exact test of `current` against `baseline` outcomes (0/1, the same examples in the
    same order): the counts, p-value, minimum detectable difference and verdict."""
    n = len(current)
    up = sum(1 for b, c in zip(baseline, current, strict=True) if not b and c)
    down = sum(1 for b, c in zip(baseline, current, strict=True) if b and not c)
    worse, better = (down, up) if higher_is_better else (up, down)
    p = mcnemar_exact(worse, better)
    verdict = "no detectable change"
    if p < alpha:
        verdict = "regressed" if worse > better else "improved"
    return {"n_paired": n, "worse": worse, "better": better, "p_value": p,
            "baseline_value": sum(baseline) / n if n else None,
            "min_detectable_difference": paired_min_detectable(n, alpha), "verdict": verdict}
