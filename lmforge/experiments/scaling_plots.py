"""The figures of `lmforge scaling fit`'s page, as PNG bytes (matplotlib, Agg)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from lmforge.experiments.lr_transfer import LrTransfer
from lmforge.experiments.scaling import IsoFlopFit, allocate, best_per_setting
from lmforge.monitor.report import png_bytes

if TYPE_CHECKING:
    from lmforge.experiments.scaling_report import ScalingResult


def _frontier_plot(result: ScalingResult, plt: Any) -> bytes:
    """Loss vs compute: the trials, the fitted compute-optimal frontier and its bootstrap band."""
    fit_ = result.chinchilla
    observed = np.array([t.point.compute for t in result.trials])
    top = max(observed.max() * 10, result.allocation.budget_flops * 2 if result.allocation else 0)
    flops = np.geomspace(observed.min() / 2, top, 200)
    loss = allocate(np.array(fit_.theta), flops)[2][0]
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    dots = ax.scatter(observed, [t.point.loss for t in result.trials], c=np.log10([t.point.params for t in result.trials]),
                      cmap="viridis", s=18, label="trials")
    fig.colorbar(dots, ax=ax, label="log10 N")
    ax.plot(flops, loss, color="C3", label="fitted compute-optimal frontier")
    if fit_.bootstrap:
        low, high = np.percentile(allocate(np.array(fit_.bootstrap), flops)[2], [2.5, 97.5], axis=0)
        ax.fill_between(flops, low, high, color="C3", alpha=0.2, label="95% bootstrap band")
    if result.allocation:
        a = result.allocation
        ax.errorbar([a.budget_flops], [a.loss.value], yerr=[[a.loss.value - (a.loss.low or a.loss.value)],
                    [(a.loss.high or a.loss.value) - a.loss.value]], fmt="*", color="black", markersize=10,
                    label=f"budget {a.budget_flops:.3g} FLOPs")
    ax.axvline(observed.max(), color="grey", linestyle=":", linewidth=1)
    ax.set(xscale="log", xlabel="training FLOPs C", ylabel=result.metric, title="loss vs compute")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return png_bytes(fig)


def _fit_plot(result: ScalingResult, plt: Any) -> bytes:
    points = best_per_setting([t.point for t in result.trials], lambda p: (p.params, p.tokens))  # what the fit saw
    predicted = result.chinchilla.predict([p.params for p in points], [p.tokens for p in points])
    observed = np.array([p.loss for p in points])
    fig, ax = plt.subplots(figsize=(4.8, 3.6), dpi=100)
    ax.scatter(predicted, observed, s=18, c=np.log10([p.tokens for p in points]), cmap="viridis")
    span = [min(predicted.min(), observed.min()), max(predicted.max(), observed.max())]
    ax.plot(span, span, color="grey", linewidth=1)
    ax.set(xlabel=f"fitted {result.metric}", ylabel=f"observed {result.metric}",
           title=f"observed vs fitted (RMSE {result.chinchilla.rmse:.3g})")
    ax.grid(alpha=0.3)
    return png_bytes(fig)


def _isoflop_plot(fit_: IsoFlopFit, metric: str, plt: Any) -> bytes:
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.6, 3.6), dpi=100)
    for i, budget in enumerate(fit_.budgets):
        left.scatter(budget.params, budget.losses, s=14, color=f"C{i % 10}", label=f"{budget.flops:.2g} FLOPs")
        if budget.parabola:
            x = np.linspace(math.log(min(budget.params)), math.log(max(budget.params)), 100)
            left.plot(np.exp(x), np.polyval(budget.parabola, x), color=f"C{i % 10}", linewidth=1,
                      linestyle="-" if budget.params_opt else ":")
        if budget.params_opt:
            left.scatter([budget.params_opt], [budget.loss_opt], marker="*", s=80, color=f"C{i % 10}")
    left.set(xscale="log", xlabel="non-embedding params N", ylabel=metric, title="iso-FLOP profiles")
    left.legend(fontsize=7)
    usable = [b for b in fit_.budgets if b.params_opt]
    flops = np.array([b.flops for b in usable])
    right.scatter(flops, [b.params_opt for b in usable], color="C0", label="N_opt")
    right.scatter(flops, [b.tokens_opt for b in usable], color="C1", label="D_opt")
    line = np.geomspace(flops.min(), flops.max(), 50)
    right.plot(line, fit_.params_coefficient * line**fit_.params_exponent.value, color="C0",
               label=f"N_opt ∝ C^{fit_.params_exponent.value:.3f}")
    right.plot(line, fit_.tokens_coefficient * line**fit_.tokens_exponent.value, color="C1",
               label=f"D_opt ∝ C^{fit_.tokens_exponent.value:.3f}")
    right.set(xscale="log", yscale="log", xlabel="training FLOPs C", title="compute-optimal N and D")
    right.legend(fontsize=7)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    return png_bytes(fig)


def _lr_plot(transfer: LrTransfer, metric: str, plt: Any) -> bytes:
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.6, 3.6), dpi=100)
    for i, width in enumerate(transfer.widths):
        left.plot(width.lrs, width.losses, marker=".", color=f"C{i % 10}", label=f"width {width.width:g}")
        left.scatter([width.best_lr], [width.best_loss], marker="*", s=80, color=f"C{i % 10}")
    left.set(xscale="log", xlabel="learning rate", ylabel=metric, title="loss vs lr per width")
    left.legend(fontsize=7)
    widths = [w.width for w in transfer.widths]
    right.plot(widths, [w.best_lr for w in transfer.widths], marker="o", label="best lr on the grid")
    right.plot(widths, [w.refined_lr or w.best_lr for w in transfer.widths], marker="x", linestyle=":",
               label="refined (parabola in log lr)")
    grid = [lr for w in transfer.widths for lr in w.lrs]  # the lrs tried, so equal best lrs read as a flat line
    right.set(xscale="log", yscale="log", xlabel="width (model.dim)", ylabel="best lr", title=transfer.verdict[:60],
              ylim=(min(grid) / 1.5, max(grid) * 1.5))
    right.legend(fontsize=7)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    return png_bytes(fig)


def plots(result: ScalingResult) -> dict[str, bytes]:
    """The report's figures as PNG bytes, by title."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    images = {}
    if result.chinchilla:
        images = {"observed vs fitted loss": _fit_plot(result, plt),
                  "loss vs compute: fitted frontier, 95% band, budget": _frontier_plot(result, plt)}
    if result.isoflop:
        images["iso-FLOP parabolas and N_opt(C)"] = _isoflop_plot(result.isoflop, result.metric, plt)
    if result.lr_transfer:
        images["best lr vs width"] = _lr_plot(result.lr_transfer, result.metric, plt)
    return images
