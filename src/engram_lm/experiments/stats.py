"""Seeds and error bars: means with standard errors, and the rule for calling a difference.

Runs that differ only in the model share their seed (same initialisation stream and the
same batches), so two variants are compared on their per-seed differences (a paired
test); the difference is called only when |mean difference| > 2 standard errors of it.
Anything else is "inconclusive at this scale", including every single-seed comparison.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import dataclass

CALL_THRESHOLD_SE = 2.0


@dataclass(frozen=True, slots=True)
class Estimate:
    mean: float
    se: float  # standard error of the mean; nan with fewer than 2 values
    n: int

    def __str__(self) -> str:
        return f"{self.mean:.4f}" if math.isnan(self.se) else f"{self.mean:.4f} ± {self.se:.4f}"


def estimate(values: list[float]) -> Estimate:
    """Mean and standard error (sample standard deviation / sqrt(n))."""
    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        raise ValueError("no values to average")
    mean = sum(values) / n
    if n < 2:
        return Estimate(mean, math.nan, n)
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return Estimate(mean, math.sqrt(var / n), n)


@dataclass(frozen=True, slots=True)
class Comparison:
    diff: Estimate  # a - b over the seeds both have
    verdict: str  # "lower", "higher" (a relative to b) or "inconclusive"

    @property
    def called(self) -> bool:
        return self.verdict != "inconclusive"


def compare(a: dict[int, float], b: dict[int, float]) -> Comparison:
    """a vs b, each {seed: value}; paired over the shared seeds."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise ValueError("the two variants share no seed; run both with the same --seeds")
    diff = estimate([a[s] - b[s] for s in seeds])
    return Comparison(diff, call(diff))


def call(diff: Estimate) -> str:
    """'lower' / 'higher' when the difference exceeds CALL_THRESHOLD_SE standard errors."""
    if diff.n < 2 or math.isnan(diff.se) or abs(diff.mean) <= CALL_THRESHOLD_SE * diff.se:
        return "inconclusive"
    return "lower" if diff.mean < 0 else "higher"


@dataclass(frozen=True, slots=True)
class Optimum:
    best: float  # the point of lowest mean value
    tied: tuple[float, ...]  # the points not called higher than it (itself included): its uncertainty
    per_seed: dict[int, float]  # each seed's own lowest point, over the points that seed has


def optimum(points: dict[float, dict[int, float]]) -> Optimum:
    """Where a sweep {point: {seed: value}} is lowest, and how sure that is: every point
    not called higher than the best (paired, 2 SE) could be the optimum too."""
    if not points:
        raise ValueError("no points to choose an optimum from")
    means = {p: estimate(list(v.values())).mean for p, v in points.items()}
    best = min(means, key=means.get)
    tied = tuple(sorted(p for p in points if not _excluded(points[p], points[best])))
    seeds = sorted({s for v in points.values() for s in v})
    per_seed = {s: min((p for p in points if s in points[p]), key=lambda p: points[p][s]) for s in seeds}
    return Optimum(best, tied, per_seed)


def _excluded(candidate: dict[int, float], best: dict[int, float]) -> bool:
    """Called higher than the best on their shared seeds (no shared seed: cannot be excluded)."""
    return bool(set(candidate) & set(best)) and compare(candidate, best).verdict == "higher"


def held_out_best(points: dict[Hashable, dict[int, float]], candidates: list[Hashable],
                  against: Hashable) -> tuple[Comparison | None, dict[int, Hashable]]:  # fmt: skip
    """The best of `candidates` against the point `against`, free of the bias of picking the
    lowest of several noisy points and testing it on the seeds that picked it: for each seed,
    the candidate with the lowest mean over the *other* seeds is chosen and scored on the
    held-out seed (its value minus `against`'s). Returns the comparison of those differences
    (None below 2) and each seed's chosen candidate."""
    diffs, chosen = [], {}
    for seed in sorted(points.get(against, {})):
        pool = [c for c in candidates if seed in points[c] and set(points[c]) - {seed}]
        if not pool:
            continue
        best = min(pool, key=lambda c: estimate([v for s, v in points[c].items() if s != seed]).mean)
        chosen[seed] = best
        diffs.append(points[best][seed] - points[against][seed])
    if len(diffs) < 2:
        return None, chosen
    diff = estimate(diffs)
    return Comparison(diff, call(diff)), chosen
