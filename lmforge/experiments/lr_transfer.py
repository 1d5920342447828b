"""Learning-rate transfer across widths: does the best lr of a sweep move as the model widens?

muP (Yang et al. 2022, arXiv:2203.03466) predicts a stable best lr under its parametrisation;
under standard parametrisation it typically falls roughly as 1/width. From (width, lr, loss)
rows: the best lr per width on the grid, refined by a parabola in log lr through the best and
its neighbours, and the slope of log best-lr against log width.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

from lmforge.experiments.scaling import ScalingDataError


@dataclass(frozen=True)
class WidthBestLr:
    """One width's lr sweep: the best run per lr, the grid's best lr and a parabola's refinement of it."""

    width: float
    lrs: tuple[float, ...]
    losses: tuple[float, ...]
    best_lr: float
    best_loss: float
    refined_lr: float | None  # vertex of a parabola in ln lr through the best lr and its two neighbours
    at_grid_edge: bool  # the best lr is the smallest or largest tried: the optimum may lie outside


@dataclass(frozen=True)
class LrTransfer:
    widths: tuple[WidthBestLr, ...]
    grid_step: float | None  # median ratio between neighbouring lrs tried
    best_lr_ratio: float  # largest best lr (refined where possible) over smallest
    slope: float | None  # d ln(best lr) / d ln(width)
    stable: bool
    verdict: str

    def to_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "stable": self.stable, "slope": self.slope, "grid_step": self.grid_step,
                "best_lr_ratio": self.best_lr_ratio,
                "widths": [{"width": w.width, "best_lr": w.best_lr, "refined_lr": w.refined_lr, "best_loss": w.best_loss,
                            "at_grid_edge": w.at_grid_edge, "lrs": list(w.lrs), "losses": list(w.losses)}
                           for w in self.widths]}


def _best_lr(width: float, by_lr: dict[float, float]) -> WidthBestLr:
    lrs = sorted(by_lr)
    losses = tuple(by_lr[lr] for lr in lrs)
    i = int(np.argmin(losses))
    refined = None
    if 0 < i < len(lrs) - 1:  # a convex parabola through a lowest middle point has its vertex between its neighbours
        c2, c1, _ = np.polyfit(np.log(lrs[i - 1 : i + 2]), losses[i - 1 : i + 2], 2)
        refined = float(math.exp(-c1 / (2 * c2))) if c2 > 0 else None
    return WidthBestLr(width, tuple(lrs), losses, lrs[i], losses[i], refined, len(lrs) < 3 or i in (0, len(lrs) - 1))


def lr_transfer(rows: Iterable[tuple[float, float, float]]) -> LrTransfer:
    """Best lr per width from (width, lr, loss) rows, and whether it shifts as the model widens."""
    table: dict[float, dict[float, float]] = defaultdict(dict)
    for width, lr, loss in rows:
        if not all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in (width, lr, loss)):
            raise ScalingDataError(f"an lr-transfer row needs a positive width, lr and loss, got {(width, lr, loss)!r}")
        table[width][lr] = min(table[width].get(lr, math.inf), loss)  # the best run per (width, lr)
    if not table:
        raise ScalingDataError("an lr-transfer check needs (width, lr, loss) rows; got none")
    widths = tuple(_best_lr(w, table[w]) for w in sorted(table))
    ratios = [hi / lo for w in widths for lo, hi in zip(w.lrs, w.lrs[1:], strict=False)]
    grid_step = float(np.median(ratios)) if ratios else None
    best = [w.refined_lr or w.best_lr for w in widths]  # the refinement sees shifts finer than the grid
    ratio = max(best) / min(best)
    edges = [w for w in widths if w.at_grid_edge and len(w.lrs) > 1]
    caveat = f" (best lr at the edge of the grid for width {', '.join(f'{w.width:g}' for w in edges)})" if edges else ""
    if len(widths) < 2:
        return LrTransfer(widths, grid_step, 1.0, None, True,
                          f"one width only: best lr {best[0]:.3g}; cannot tell whether it shifts with width{caveat}")
    slope = float(stats.linregress(np.log([w.width for w in widths]), np.log(best)).slope)
    # Stable: the best lrs lie within less than one grid step of each other (a whole step, e.g.
    # two widths picking neighbouring grid points, is a shift the grid saw).
    stable = ratio < (grid_step or 1.0) * (1 - 1e-6)
    if stable:
        verdict = "best lr stable across widths (within one grid step)"
    elif abs(slope) < 0.1:
        verdict = f"best lr varies {ratio:.3g}x across widths without a trend in width (slope {slope:.2f})"
    else:
        verdict = f"best lr {'falls' if slope < 0 else 'rises'} as width^{slope:.2g}"
    return LrTransfer(widths, grid_step, float(ratio), slope, stable, verdict + caveat)
