"""Scaling laws over a sweep's finished trials: pure math, no I/O.

- `fit_chinchilla`: L(N, D) = E + A/N^alpha + B/D^beta, fitted as Hoffmann et al. 2022
  (arXiv:2203.15556, approach 3), with bootstrap intervals as Besiroglu et al. 2024
  (arXiv:2404.10102, "Chinchilla Scaling: A replication attempt") recommend.
- `optimal_allocation`: the compute-optimal N and D for a budget C = 6ND under that fit.
- `isoflop`: approach 2 of Hoffmann et al.: a parabola of loss in log N per compute budget,
  then N_opt ∝ C^a and D_opt ∝ C^b by least squares in log space.
(`lmforge.experiments.lr_transfer` asks the sweep's other question: does the best lr move with width?)

N is the non-embedding parameter count, D the training tokens, C the training FLOPs.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import optimize, special, stats

from lmforge.errors import ConfigError, DataError

HUBER_DELTA = 1e-3  # Hoffmann et al. 2022, appendix D.2
MIN_CHINCHILLA_POINTS = 5  # five free parameters: E, A, alpha, B, beta
# Hoffmann et al. 2022, D.2: initialise from a grid over alpha, beta, e = log E, a = log A, b = log B.
GRID_EXPONENTS = (0.0, 0.5, 1.0, 1.5, 2.0)
GRID_LOG_E = (-1.0, -0.5, 0.0, 0.5, 1.0)
GRID_LOG_AB = (0.0, 5.0, 10.0, 15.0, 20.0, 25.0)
# Exponents stay positive: at 0 a term merges with E and the allocation's closed form is undefined.
EXPONENT_BOUNDS = (1e-3, 5.0)
LBFGS_STARTS = 8  # L-BFGS from the best grid points; starting from all 4,500 changes nothing but the time


class ScalingDataError(DataError):
    """Too few, or unusable, points for a scaling-law fit."""


@dataclass(frozen=True)
class ScalingPoint:
    """One finished trial: N (non-embedding params), D (tokens), its final loss, its FLOPs."""

    params: float
    tokens: float
    loss: float
    flops: float | None = None
    name: str | None = None  # the trial it came from, for error messages

    @property
    def compute(self) -> float:
        """Training FLOPs: as measured, else the 6ND estimate (Kaplan et al. 2020, section 2.1)."""
        return float(self.flops) if self.flops else 6.0 * self.params * self.tokens


@dataclass(frozen=True)
class Estimate:
    """A fitted number with its bootstrap (or least-squares) standard error and 95% interval."""

    value: float
    stderr: float | None = None
    low: float | None = None
    high: float | None = None

    def to_dict(self) -> dict[str, Any]:
        interval = None if self.low is None else [self.low, self.high]
        return {"value": self.value, "stderr": self.stderr, "interval": interval}


def _bootstrap_estimate(value: float, samples: np.ndarray) -> Estimate:
    samples = samples[np.isfinite(samples)]
    if len(samples) < 2:
        return Estimate(float(value))
    low, high = np.percentile(samples, [2.5, 97.5])  # percentile bootstrap (Efron & Tibshirani 1993, ch. 13)
    return Estimate(float(value), float(np.std(samples, ddof=1)), float(low), float(high))


@dataclass(frozen=True)
class ParametricFit:
    """L(N, D) = E + A/N^alpha + B/D^beta, with N_opt ∝ C^a, D_opt ∝ C^b (a = beta/(alpha+beta))."""

    E: Estimate
    A: Estimate
    alpha: Estimate
    B: Estimate
    beta: Estimate
    a: Estimate
    b: Estimate
    rmse: float  # of the loss, in the loss's units
    rmse_log: float  # of log loss: the space the fit minimises in
    points: int
    theta: tuple[float, ...]  # (log A, alpha, log B, beta, log E) at the optimum
    bootstrap: tuple[tuple[float, ...], ...] = field(default=(), repr=False)  # one theta per refit
    bootstrap_skipped: int = 0  # resamples with fewer than 2 sizes or token counts

    def predict(self, params: Any, tokens: Any) -> np.ndarray:
        return _predict(np.asarray(self.theta), np.asarray(params, float), np.asarray(tokens, float))

    def to_dict(self) -> dict[str, Any]:
        names = ("E", "A", "alpha", "B", "beta")
        return {
            "form": "L(N, D) = E + A / N^alpha + B / D^beta",
            "coefficients": {name: getattr(self, name).to_dict() for name in names},
            "params_exponent_a": self.a.to_dict(), "tokens_exponent_b": self.b.to_dict(),
            "rmse": self.rmse, "rmse_log": self.rmse_log, "points": self.points,
            "bootstrap_samples": len(self.bootstrap), "bootstrap_skipped": self.bootstrap_skipped,
        }


def _predict(theta: np.ndarray, params: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    log_a, alpha, log_b, beta, log_e = theta
    return np.exp(log_e) + np.exp(log_a) / params**alpha + np.exp(log_b) / tokens**beta


def _huber_objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_loss: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean Huber loss of LSE(a - alpha log N, b - beta log D, e) - log L, and its gradient.

    Divided by delta so that values and gradients are O(residual): the unscaled sum is ~1e-6
    and L-BFGS would stop at once (the early stop Besiroglu et al. 2024 found in the original).
    """
    log_a, alpha, log_b, beta, log_e = theta
    size_term, data_term = log_a - alpha * log_n, log_b - beta * log_d
    top = np.maximum(np.maximum(size_term, data_term), log_e)  # a stable log-sum-exp, written out: it is the hot loop
    size_w, data_w, e_w = np.exp(size_term - top), np.exp(data_term - top), np.exp(log_e - top)
    total = size_w + data_w + e_w
    residual = top + np.log(total) - log_loss
    clipped = np.clip(residual, -HUBER_DELTA, HUBER_DELTA)  # dHuber/dr
    huber = clipped * (residual - 0.5 * clipped)  # 0.5 r^2 inside delta, delta (|r| - delta/2) outside
    size_w, data_w, e_w = (clipped * w / total for w in (size_w, data_w, e_w))  # times the softmax weights
    grad = np.array([size_w.sum(), -(size_w @ log_n), data_w.sum(), -(data_w @ log_d), e_w.sum()])
    scale = HUBER_DELTA * len(log_n)
    return float(huber.sum() / scale), grad / scale


def _grid() -> np.ndarray:
    mesh = np.meshgrid(GRID_LOG_AB, GRID_EXPONENTS, GRID_LOG_AB, GRID_EXPONENTS, GRID_LOG_E, indexing="ij")
    grid = np.stack([m.ravel() for m in mesh], axis=1)
    grid[:, [1, 3]] = np.clip(grid[:, [1, 3]], *EXPONENT_BOUNDS)
    return grid


def _grid_objective(grid: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_loss: np.ndarray) -> np.ndarray:
    """The objective at every grid point at once (chunks keep memory small for big sweeps)."""
    out = []
    for chunk in np.array_split(grid, max(1, len(grid) * len(log_n) // 500_000)):
        terms = np.stack([chunk[:, :1] - chunk[:, 1:2] * log_n, chunk[:, 2:3] - chunk[:, 3:4] * log_d,
                          np.broadcast_to(chunk[:, 4:5], (len(chunk), len(log_n)))])
        residual = np.abs(special.logsumexp(terms, axis=0) - log_loss)
        out.append(np.where(residual <= HUBER_DELTA, 0.5 * residual**2, HUBER_DELTA * (residual - 0.5 * HUBER_DELTA)).sum(1))
    return np.concatenate(out)


def _minimise(starts: Iterable[np.ndarray], log_n: np.ndarray, log_d: np.ndarray, log_loss: np.ndarray) -> tuple[np.ndarray, float]:
    bounds = [(None, None), EXPONENT_BOUNDS, (None, None), EXPONENT_BOUNDS, (None, None)]
    best, best_value = None, math.inf
    for start in starts:
        result = optimize.minimize(_huber_objective, start, args=(log_n, log_d, log_loss), jac=True, method="L-BFGS-B",
                                   bounds=bounds, options={"maxiter": 5000, "ftol": 1e-15, "gtol": 1e-11})
        if np.isfinite(result.fun) and result.fun < best_value:
            best, best_value = result.x, float(result.fun)
    assert best is not None
    return best, best_value


def _best_starts(grid: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_loss: np.ndarray, count: int) -> list[np.ndarray]:
    values = _grid_objective(grid, log_n, log_d, log_loss)
    return [grid[i] for i in np.argsort(values, kind="stable")[:count]]


def best_per_setting(points: Sequence[ScalingPoint], key: Any) -> list[ScalingPoint]:
    """The lowest-loss point per `key(point)`: a sweep varies lr, seeds and more at each size too."""
    best: dict[Any, ScalingPoint] = {}
    for p in points:
        if key(p) not in best or p.loss < best[key(p)].loss:
            best[key(p)] = p
    return list(best.values())


def validate(points: Sequence[ScalingPoint]) -> None:
    """Refuse, naming the trial, a loss, size or token count that is not a positive finite number."""
    for point in points:
        for name in ("params", "tokens", "loss", "flops"):
            value = getattr(point, name)
            if name == "flops" and value is None:
                continue
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                where = f"trial {point.name}" if point.name else "a point"
                raise ScalingDataError(f"{where}: {name} must be a positive number, got {value!r}")


def fit_chinchilla(points: Sequence[ScalingPoint], n_bootstrap: int = 200, seed: int = 0,
                   source: str = "the data") -> ParametricFit:
    """Fit L(N, D) = E + A/N^alpha + B/D^beta (Hoffmann et al. 2022, approach 3) with bootstrap intervals."""
    validate(points)
    points = best_per_setting(points, lambda p: (p.params, p.tokens))
    sizes, token_counts = {p.params for p in points}, {p.tokens for p in points}
    if len(points) < MIN_CHINCHILLA_POINTS or len(sizes) < 2 or len(token_counts) < 2:
        raise ScalingDataError(
            f"a Chinchilla fit needs at least {MIN_CHINCHILLA_POINTS} finished trials of distinct (size, tokens) with "
            f"2+ distinct sizes and 2+ distinct token counts; {source} has {len(points)} ({len(sizes)} sizes, "
            f"{len(token_counts)} token counts)")
    log_n = np.log([p.params for p in points])
    log_d = np.log([p.tokens for p in points])
    log_loss = np.log([p.loss for p in points])
    theta, _ = _minimise(_best_starts(_grid(), log_n, log_d, log_loss, LBFGS_STARTS), log_n, log_d, log_loss)
    # Bootstrap over points (Efron 1979): each resample refitted from the full fit's optimum, which lies close.
    rng = np.random.default_rng(seed)
    refits, skipped = [], 0
    for _ in range(n_bootstrap):
        index = rng.integers(0, len(points), len(points))
        if len(np.unique(log_n[index])) < 2 or len(np.unique(log_d[index])) < 2:
            skipped += 1
            continue
        refits.append(_minimise([theta], log_n[index], log_d[index], log_loss[index])[0])
    samples = np.array(refits).reshape(-1, 5)
    return _parametric_fit(theta, samples, skipped, log_n, log_d, log_loss)


def _parametric_fit(theta: np.ndarray, samples: np.ndarray, skipped: int, log_n: np.ndarray, log_d: np.ndarray,
                    log_loss: np.ndarray) -> ParametricFit:
    predicted = _predict(theta, np.exp(log_n), np.exp(log_d))
    observed = np.exp(log_loss)

    def exponent_a(t: np.ndarray) -> np.ndarray:  # N_opt ∝ C^(beta/(alpha+beta)), Hoffmann et al. eq. 4
        return t[..., 3] / (t[..., 1] + t[..., 3])

    return ParametricFit(
        E=_bootstrap_estimate(math.exp(theta[4]), np.exp(samples[:, 4])),
        A=_bootstrap_estimate(math.exp(theta[0]), np.exp(samples[:, 0])),
        alpha=_bootstrap_estimate(theta[1], samples[:, 1]),
        B=_bootstrap_estimate(math.exp(theta[2]), np.exp(samples[:, 2])),
        beta=_bootstrap_estimate(theta[3], samples[:, 3]),
        a=_bootstrap_estimate(float(exponent_a(theta)), exponent_a(samples)),
        b=_bootstrap_estimate(1.0 - float(exponent_a(theta)), 1.0 - exponent_a(samples)),
        rmse=float(np.sqrt(np.mean((predicted - observed) ** 2))),
        rmse_log=float(np.sqrt(np.mean((np.log(predicted) - log_loss) ** 2))),
        points=len(log_n), theta=tuple(float(x) for x in theta),
        bootstrap=tuple(tuple(float(x) for x in row) for row in samples), bootstrap_skipped=skipped,
    )


@dataclass(frozen=True)
class Allocation:
    """The compute-optimal split of a FLOP budget C = 6ND under a parametric fit."""

    budget_flops: float
    params: Estimate
    tokens: Estimate
    loss: Estimate

    def to_dict(self) -> dict[str, Any]:
        return {"budget_flops": self.budget_flops, "params": self.params.to_dict(), "tokens": self.tokens.to_dict(),
                "loss": self.loss.to_dict()}


def allocate(thetas: np.ndarray, flops: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """N_opt, D_opt and the loss there for each theta (rows) and budget (columns).

    Hoffmann et al. 2022, eq. 4: N_opt = G (C/6)^(beta/(alpha+beta)), G = (alpha A / (beta B))^(1/(alpha+beta)).
    """
    thetas = np.atleast_2d(thetas)
    log_a, alpha, log_b, beta, _ = (thetas[:, i : i + 1] for i in range(5))
    log_c6 = np.log(np.asarray(flops, float) / 6.0)[None, :]
    log_g = (np.log(alpha) + log_a - np.log(beta) - log_b) / (alpha + beta)
    params = np.exp(log_g + beta / (alpha + beta) * log_c6)
    tokens = np.exp(log_c6) / params
    return params, tokens, np.stack([_predict(t, n, d) for t, n, d in zip(thetas, params, tokens, strict=True)])


def optimal_allocation(fit: ParametricFit, budget_flops: float) -> Allocation:
    """The N and D that minimise the fitted loss at C = 6ND FLOPs, with bootstrap intervals."""
    if not isinstance(budget_flops, (int, float)) or not math.isfinite(budget_flops) or budget_flops <= 0:
        raise ConfigError(f"the compute budget must be a positive number of FLOPs (e.g. 1e18), got {budget_flops!r}")
    params, tokens, loss = (x[0, 0] for x in allocate(np.array(fit.theta), np.array([budget_flops])))
    samples = np.array(fit.bootstrap).reshape(-1, 5)
    boot = allocate(samples, np.array([budget_flops])) if len(samples) else (np.empty((0, 1)),) * 3
    return Allocation(float(budget_flops), *(_bootstrap_estimate(float(v), s[:, 0])
                                             for v, s in zip((params, tokens, loss), boot, strict=True)))


@dataclass(frozen=True)
class IsoFlopBudget:
    """One compute budget of approach 2: the best loss per size and the parabola through them."""

    flops: float  # geometric mean of the group's FLOPs
    params: tuple[float, ...]
    losses: tuple[float, ...]
    parabola: tuple[float, float, float] | None = None  # loss = c2 x^2 + c1 x + c0, x = ln N
    params_opt: float | None = None
    tokens_opt: float | None = None
    loss_opt: float | None = None
    skipped: str | None = None  # why this budget gave no N_opt


@dataclass(frozen=True)
class IsoFlopFit:
    """N_opt = k_N C^a and D_opt = k_D C^b over the budgets whose parabola had an interior minimum."""

    budgets: tuple[IsoFlopBudget, ...]
    params_exponent: Estimate  # a
    params_coefficient: float  # k_N
    tokens_exponent: Estimate  # b
    tokens_coefficient: float  # k_D

    def to_dict(self) -> dict[str, Any]:
        return {
            "params_exponent_a": self.params_exponent.to_dict(), "params_coefficient": self.params_coefficient,
            "tokens_exponent_b": self.tokens_exponent.to_dict(), "tokens_coefficient": self.tokens_coefficient,
            "budgets": [{"flops": b.flops, "params": list(b.params), "losses": list(b.losses),
                         "parabola": list(b.parabola) if b.parabola else None, "params_opt": b.params_opt,
                         "tokens_opt": b.tokens_opt, "loss_opt": b.loss_opt, "skipped": b.skipped} for b in self.budgets],
        }


def group_by_budget(points: Sequence[ScalingPoint], rel_tol: float = 0.1,
                    bins_per_decade: int | None = None) -> list[list[ScalingPoint]]:
    """Points of one compute budget: FLOPs within `rel_tol` of the group's smallest, or one log10 bin."""
    ordered = sorted(points, key=lambda p: p.compute)
    if bins_per_decade:
        bins: dict[int, list[ScalingPoint]] = defaultdict(list)
        for p in ordered:
            bins[round(math.log10(p.compute) * bins_per_decade)].append(p)
        return list(bins.values())
    groups: list[list[ScalingPoint]] = []
    for p in ordered:
        if groups and p.compute <= groups[-1][0].compute * (1.0 + rel_tol):
            groups[-1].append(p)
        else:
            groups.append([p])
    return groups


def _budget_minimum(group: list[ScalingPoint]) -> IsoFlopBudget:
    flops = float(np.exp(np.mean([np.log(p.compute) for p in group])))
    best = sorted(best_per_setting(group, lambda p: p.params), key=lambda p: p.params)
    sizes, losses = [p.params for p in best], tuple(p.loss for p in best)
    if len(sizes) < 3:
        return IsoFlopBudget(flops, tuple(sizes), losses, skipped=f"{len(sizes)} sizes (a parabola needs 3)")
    x = np.log(sizes)
    c2, c1, c0 = (float(c) for c in np.polyfit(x, losses, 2))
    if c2 <= 0:
        return IsoFlopBudget(flops, tuple(sizes), losses, (c2, c1, c0), skipped="loss is not convex in log N")
    vertex = -c1 / (2 * c2)
    if not x[0] <= vertex <= x[-1]:
        where = "below the smallest" if vertex < x[0] else "above the largest"
        return IsoFlopBudget(flops, tuple(sizes), losses, (c2, c1, c0), skipped=f"minimum {where} size sampled")
    params_opt = math.exp(vertex)
    return IsoFlopBudget(flops, tuple(sizes), losses, (c2, c1, c0), params_opt, flops / (6 * params_opt),
                         c0 - c1**2 / (4 * c2))


def power_law(x: Sequence[float], y: Sequence[float]) -> tuple[Estimate, float]:
    """y = k x^p by least squares in log space: p with its standard error and t-interval, and k."""
    result = stats.linregress(np.log(x), np.log(y))
    if len(x) < 3:
        return Estimate(float(result.slope)), float(math.exp(result.intercept))
    half = stats.t.ppf(0.975, len(x) - 2) * result.stderr
    return (Estimate(float(result.slope), float(result.stderr), float(result.slope - half), float(result.slope + half)),
            float(math.exp(result.intercept)))


def isoflop(points: Sequence[ScalingPoint], rel_tol: float = 0.1, bins_per_decade: int | None = None,
            source: str = "the data") -> IsoFlopFit:
    """Approach 2 (Hoffmann et al. 2022): per budget, the vertex of a parabola in ln N; then N_opt ∝ C^a."""
    validate(points)
    budgets = tuple(_budget_minimum(g) for g in group_by_budget(points, rel_tol, bins_per_decade))
    usable = [b for b in budgets if b.params_opt is not None]
    if len(usable) < 2:
        reasons = "; ".join(f"{b.flops:.3g} FLOPs: {b.skipped}" for b in budgets if b.skipped) or "none"
        raise ScalingDataError(f"an iso-FLOP fit needs 2+ compute budgets with 3+ sizes each and a minimum inside the "
                               f"sizes sampled; {source} has {len(usable)} of {len(budgets)} (skipped: {reasons})")
    flops = [b.flops for b in usable]
    params_exponent, params_coefficient = power_law(flops, [b.params_opt for b in usable])
    tokens_exponent, tokens_coefficient = power_law(flops, [b.tokens_opt for b in usable])
    return IsoFlopFit(budgets, params_exponent, params_coefficient, tokens_exponent, tokens_coefficient)

