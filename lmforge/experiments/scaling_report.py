"""`lmforge scaling fit SWEEP`: scaling laws over a sweep's finished trials, as JSON and one HTML page.

Reads `SWEEP/trials/<id>/trial.json` (status, final metric, N, D, FLOPs) and each trial's
`config.yaml` (model.dim, optim.lr); fits the Chinchilla law, the iso-FLOP minima when the
sweep has several sizes per budget, the lr-transfer check when it varied lr and width, and
the compute-optimal allocation for a budget. Writes `SWEEP/scaling/scaling.json` (every
number) and `scaling.html` (the plots inlined, as `lmforge report` does) atomically.
"""

from __future__ import annotations

import html
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge import atomic
from lmforge.errors import ConfigError
from lmforge.experiments.lr_transfer import LrTransfer, lr_transfer
from lmforge.experiments.scaling import (
    EXPONENT_BOUNDS,
    Allocation,
    IsoFlopFit,
    ParametricFit,
    ScalingDataError,
    ScalingPoint,
    fit_chinchilla,
    isoflop,
    optimal_allocation,
)
from lmforge.experiments.scaling_plots import plots
from lmforge.experiments.sweep_dir import FIT_DIR, TRIAL_FILE, SweepDir
from lmforge.monitor.report import STYLE, figure
from lmforge.store.run_dir import RunDir

OUTPUT_KIND = FIT_DIR  # atomic's output marker: what `lmforge sweep --overwrite` may remove


@dataclass(frozen=True)
class Trial:
    """A finished trial as a scaling point, with the width and lr its config trained with."""

    point: ScalingPoint
    width: float | None
    lr: float | None


@dataclass
class ScalingResult:
    sweep_dir: Path
    out_dir: Path
    metric: str
    trials: list[Trial]
    skipped: dict[str, int]  # trials not counted, by status
    chinchilla: ParametricFit | None  # None: too few sizes/token counts (chinchilla_note says why)
    chinchilla_note: str | None = None
    allocation: Allocation | None = None
    isoflop: IsoFlopFit | None = None
    isoflop_note: str | None = None
    lr_transfer: LrTransfer | None = None
    lr_transfer_note: str | None = None
    images: dict[str, bytes] = field(default_factory=dict, repr=False)

    @property
    def json_path(self) -> Path:
        return self.out_dir / "scaling.json"

    @property
    def html_path(self) -> Path:
        return self.out_dir / "scaling.html"

    def to_dict(self) -> dict[str, Any]:
        return {
            "sweep": str(self.sweep_dir.resolve()), "metric": self.metric,
            "trials": {"used": len(self.trials), "skipped": self.skipped},
            "points": [{"trial": t.point.name, "params": t.point.params, "tokens": t.point.tokens,
                        "flops": t.point.compute, "loss": t.point.loss, "width": t.width, "lr": t.lr} for t in self.trials],
            "chinchilla": self.chinchilla.to_dict() if self.chinchilla else None, "chinchilla_note": self.chinchilla_note,
            "allocation": self.allocation.to_dict() if self.allocation else None,
            "isoflop": self.isoflop.to_dict() if self.isoflop else None, "isoflop_note": self.isoflop_note,
            "lr_transfer": self.lr_transfer.to_dict() if self.lr_transfer else None,
            "lr_transfer_note": self.lr_transfer_note, "cautions": cautions(self),
        }


def cautions(result: ScalingResult) -> list[str]:
    """What a reader must know before trusting the fit: unidentified terms, wide intervals, extrapolation."""
    out, fit_ = [], result.chinchilla
    if fit_ is None:
        return out
    losses = [t.point.loss for t in result.trials]
    for name, coefficient, what, sampled in (("alpha", "A", "sizes", [t.point.params for t in result.trials]),
                                             ("beta", "B", "token counts", [t.point.tokens for t in result.trials])):
        value, scale = getattr(fit_, name).value, getattr(fit_, coefficient).value
        # The term's own spread over the sampled range: next to nothing means the data did not fix it.
        spread = scale * (min(sampled) ** -value - max(sampled) ** -value)
        if not EXPONENT_BOUNDS[0] * 1.01 < value < EXPONENT_BOUNDS[1] * 0.99 or spread < 0.01 * (max(losses) - min(losses)):
            out.append(f"{name} = {value:.3g}, {coefficient} = {scale:.3g}: the sweep's {what} barely change the fitted "
                       "loss, so that term is not identified (widen the range or train longer); the allocation is not "
                       "meaningful")
    if fit_.E.value < 1e-3 * min(losses):
        out.append(f"E = {fit_.E.value:.3g}: the sweep shows no loss floor (its runs are far from one), so the "
                   "prediction at the budget rests on the power laws alone")
    a = result.allocation
    if a is not None:
        for name, estimate, sampled in (("N", a.params, [t.point.params for t in result.trials]),
                                        ("D", a.tokens, [t.point.tokens for t in result.trials])):
            if estimate.low and estimate.high and estimate.high / estimate.low > 100:
                out.append(f"the 95% interval of {name} spans {estimate.high / estimate.low:.3g}x: "
                           "the sweep does not pin the allocation down")
            factor = estimate.value / max(sampled)
            if factor > 10:
                out.append(f"{name} = {sci(estimate.value)} is {factor:.3g}x the largest sampled ({sci(max(sampled))}): "
                           "an extrapolation")
    return out


def parse_budget(value: str | float | None) -> float | None:
    """A FLOP budget from `1e18`, `1.5e17` or a number; a one-line error for anything else."""
    if value is None:
        return None
    try:
        budget = float(value)
    except (TypeError, ValueError):
        budget = math.nan
    if not math.isfinite(budget) or budget <= 0:
        raise ConfigError(f"--budget must be a positive number of FLOPs such as 1e18 or 1.5e17, got {value!r}")
    return budget


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _lr(params: dict[str, Any], config: dict[str, Any]) -> float | None:
    swept = next((v for k, v in params.items() if k == "lr" or k.endswith(".lr")), None)
    optim = config.get("optim") if isinstance(config.get("optim"), dict) else {}
    return _number(swept if swept is not None else optim.get("lr"))


def collect(sweep_dir: str | os.PathLike) -> tuple[list[Trial], dict[str, int]]:
    """The done trials with a finite metric, as points; the others counted by status."""
    root = Path(sweep_dir)
    trials_dir = SweepDir(root).trials
    if not trials_dir.is_dir():
        raise ConfigError(f"not a sweep dir: {root} has no trials/ (write one with `lmforge sweep run`)")
    trials, skipped = [], Counter()
    for trial_dir in sorted(p for p in trials_dir.iterdir() if p.is_dir()):
        record = atomic.read_json(trial_dir / TRIAL_FILE)
        status = record.get("status") if record else "unreadable"
        loss = _number(record.get("metric"))
        if status != "done" or loss is None or not math.isfinite(loss):
            skipped[str(status or "unknown") if status != "done" else "done without a finite metric"] += 1
            continue
        metrics = record.get("metrics") if isinstance(record.get("metrics"), dict) else {}
        name = str(record.get("id") or trial_dir.name)
        missing = [k for k in ("params", "tokens") if _number(metrics.get(k)) is None]
        if missing:
            raise ScalingDataError(f"trial {name} ({trial_dir / TRIAL_FILE}): metrics has no {' or '.join(missing)}")
        config = RunDir(trial_dir).read_config() or {}
        model = config.get("model") if isinstance(config.get("model"), dict) else {}
        params = record.get("params") if isinstance(record.get("params"), dict) else {}
        point = ScalingPoint(metrics["params"], metrics["tokens"], loss, _number(metrics.get("flops")) or None, name)
        trials.append(Trial(point, _number(model.get("dim")), _lr(params, config)))
    return trials, {k: v for k, v in skipped.items() if v}


def _metric_name(sweep_dir: Path) -> str:
    """The sweep's metric (sweep.yaml); refused when the sweep maximised it: a scaling law fits a loss."""
    spec = SweepDir(sweep_dir).read_spec()
    metric = spec.get("metric") if isinstance(spec.get("metric"), str) else "val_loss"
    if spec.get("mode") == "max":
        raise ConfigError(f"{sweep_dir}: a scaling law fits a loss, but the sweep maximised {metric} (mode: max)")
    return metric


def fit(sweep_dir: str | os.PathLike, budget: str | float | None = None, out: str | os.PathLike | None = None,
        overwrite: bool = False, n_bootstrap: int = 200, seed: int = 0) -> ScalingResult:
    """Fit scaling laws over a sweep dir; write `scaling.json` and `scaling.html` to `out` (default SWEEP/scaling)."""
    root = Path(sweep_dir)
    budget_flops = parse_budget(budget)
    out_dir = Path(out) if out else root / FIT_DIR
    atomic.check_output_dir(out_dir, OUTPUT_KIND, overwrite=overwrite, inputs=[root])
    metric = _metric_name(root)
    trials, skipped = collect(root)
    points = [t.point for t in trials]
    result = ScalingResult(root, out_dir, metric, trials, skipped, None)
    _lr_transfer(result)
    try:
        result.chinchilla = fit_chinchilla(points, n_bootstrap=n_bootstrap, seed=seed, source=str(root))
    except ScalingDataError as err:
        others = ", ".join(f"{n} {status}" for status, n in sorted(skipped.items()))
        message = f"{err}{f' (not counted: {others})' if others else ''}"
        if result.lr_transfer is None:  # nothing to report at all
            raise ScalingDataError(message) from None
        result.chinchilla_note = message  # an lr x width sweep at one token count: the lr check alone
    if budget_flops is not None and result.chinchilla is not None:
        result.allocation = optimal_allocation(result.chinchilla, budget_flops)
    try:
        result.isoflop = isoflop(points, source=str(root))
    except ScalingDataError as err:
        result.isoflop_note = str(err)
    result.images = plots(result)
    with atomic.atomic_dir(out_dir, OUTPUT_KIND) as tmp:
        atomic.write_json(tmp / "scaling.json", result.to_dict())
        atomic.write_text(tmp / "scaling.html", render_html(result))
    return result


def _lr_transfer(result: ScalingResult) -> None:
    lr_rows = [(t.width, t.lr, t.point.loss) for t in result.trials if t.width and t.lr]
    lrs_by_width: dict[float, set[float]] = {}
    for width, lr, _ in lr_rows:
        lrs_by_width.setdefault(width, set()).add(lr)
    compared = [w for w, lrs in lrs_by_width.items() if len(lrs) >= 2]  # a width trained at one lr shows no optimum
    if len(compared) >= 2:
        result.lr_transfer = lr_transfer([row for row in lr_rows if row[0] in compared])
    else:
        result.lr_transfer_note = (f"the sweep's finished trials have {len(compared)} widths (model.dim) trained at "
                                   "2+ learning rates; the lr-transfer check needs 2 such widths")


def sci(value: float, digits: int = 3) -> str:
    """1e+18 -> '1e18', 1.5e+17 -> '1.5e17': numbers as `--budget` takes them."""
    mantissa, _, exponent = f"{value:.{digits}g}".partition("e")
    return f"{mantissa}e{int(exponent)}" if exponent else mantissa


def _interval(estimate: Any, spec: str = ".4g") -> str:
    if estimate.low is None:
        return "-"
    return f"[{estimate.low:{spec}}, {estimate.high:{spec}}]"


def _rows(head: list[str], rows: list[list[Any]]) -> str:
    cells = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    header = f"<tr>{''.join(f'<th>{html.escape(h)}</th>' for h in head)}</tr>" if any(head) else ""
    return f"<table>{header}{cells}</table>"


def _coefficient_rows(result: ScalingResult) -> list[list[Any]]:
    fit_ = result.chinchilla
    named = [("E", fit_.E), ("A", fit_.A), ("alpha", fit_.alpha), ("B", fit_.B), ("beta", fit_.beta),
             ("a = beta/(alpha+beta): N_opt ∝ C^a", fit_.a), ("b = alpha/(alpha+beta): D_opt ∝ C^b", fit_.b)]
    return [[name, f"{e.value:.4g}", "-" if e.stderr is None else f"{e.stderr:.2g}", _interval(e)] for name, e in named]


def render_html(result: ScalingResult) -> str:
    """One self-contained page: tables of every fit, the figures inlined as data URIs."""
    fit_ = result.chinchilla
    skipped = ", ".join(f"{n} {status}" for status, n in sorted(result.skipped.items())) or "none"
    rows = [["sweep", result.sweep_dir.resolve()], ["metric (the loss fitted)", result.metric],
            ["trials counted (done, finite metric)", len(result.trials)], ["not counted", skipped]]
    if fit_ is not None:
        rows += [["bootstrap refits", f"{len(fit_.bootstrap)} ({fit_.bootstrap_skipped} resamples skipped)"],
                 ["residual RMSE (loss, log loss)", f"{fit_.rmse:.4g}, {fit_.rmse_log:.4g}"]]
    overview = _rows(["", ""], rows)
    sections = ["<h2>Chinchilla fit: L(N, D) = E + A/N^alpha + B/D^beta</h2>" + (
        _rows(['coefficient', 'value', 'stderr', '95% interval'], _coefficient_rows(result)) if fit_ is not None
        else f"<p>not fitted: {html.escape(result.chinchilla_note or '')}</p>")]
    if result.allocation:
        a = result.allocation
        sections.append(f"<h2>Compute-optimal allocation for C = {sci(a.budget_flops)} FLOPs</h2>" + _rows(
            ["", "value", "95% interval"],
            [[name, f"{e.value:.4g}", _interval(e)] for name, e in (("params N", a.params), ("tokens D", a.tokens),
                                                                  (f"predicted {result.metric}", a.loss))]))
    if result.isoflop:
        iso = result.isoflop
        rows = [[f"{b.flops:.3g}", len(b.params), "-" if b.params_opt is None else f"{b.params_opt:.4g}",
                 "-" if b.tokens_opt is None else f"{b.tokens_opt:.4g}", "-" if b.loss_opt is None else f"{b.loss_opt:.4g}",
                 b.skipped or ""] for b in iso.budgets]
        sections.append(f"<h2>Iso-FLOP (approach 2)</h2><p>N_opt ∝ C^{iso.params_exponent.value:.4g} "
                        f"{_interval(iso.params_exponent)}, D_opt ∝ C^{iso.tokens_exponent.value:.4g} "
                        f"{_interval(iso.tokens_exponent)}</p>"
                        + _rows(["FLOPs", "sizes", "N_opt", "D_opt", "loss at N_opt", "skipped"], rows))
    else:
        sections.append(f"<h2>Iso-FLOP (approach 2)</h2><p>not fitted: {html.escape(result.isoflop_note or '')}</p>")
    if result.lr_transfer:
        lt = result.lr_transfer
        rows = [[f"{w.width:g}", f"{w.best_lr:.3g}", "-" if w.refined_lr is None else f"{w.refined_lr:.3g}",
                 f"{w.best_loss:.4g}", "yes" if w.at_grid_edge else ""] for w in lt.widths]
        sections.append(f"<h2>Learning-rate transfer</h2><p>{html.escape(lt.verdict)}</p>"
                        + _rows(["width", "best lr", "refined lr", "best loss", "at grid edge"], rows))
    else:
        sections.append(f"<h2>Learning-rate transfer</h2><p>not checked: {html.escape(result.lr_transfer_note or '')}</p>")
    figures = "".join(figure(png, title) for title, png in result.images.items())
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>lmforge scaling: {html.escape(result.sweep_dir.name)}</title>
{STYLE}</head><body>
<h1>Scaling laws: {html.escape(result.sweep_dir.name)}</h1>
<h2>Overview</h2>{overview}
{''.join(f"<p><b>Caution:</b> {html.escape(text)}</p>" for text in cautions(result))}
{''.join(sections)}
<h2>Figures</h2><div class="charts">{figures}</div>
<h2>Numbers</h2><p>Every number above is in scaling.json beside this page.</p>
</body></html>
"""


def summary_lines(result: ScalingResult) -> list[str]:
    """What `lmforge scaling fit` prints: the coefficients with intervals and the budget's answer."""
    fit_ = result.chinchilla
    skipped = ", ".join(f"{n} {status}" for status, n in sorted(result.skipped.items()))
    lines = [f"{len(result.trials)} trials of {result.sweep_dir}" + (f" (not counted: {skipped})" if skipped else "")]
    if fit_ is None:
        lines.append(f"Chinchilla fit: not fitted ({result.chinchilla_note})")
    else:
        lines.append(f"Chinchilla fit L(N, D) = E + A/N^alpha + B/D^beta; residual RMSE {fit_.rmse:.3g}")
        lines += [f"  {name:<44} {value:<10} ± {stderr:<8} 95% {interval}"
                  for name, value, stderr, interval in _coefficient_rows(result)]
    if result.isoflop:
        iso = result.isoflop
        lines.append(f"iso-FLOP: N_opt ∝ C^{iso.params_exponent.value:.3f} {_interval(iso.params_exponent, '.3f')} "
                     f"over {sum(b.params_opt is not None for b in iso.budgets)} budgets")
    else:
        lines.append(f"iso-FLOP: not fitted ({result.isoflop_note})")
    lines.append(f"lr transfer: {result.lr_transfer.verdict}" if result.lr_transfer
                 else f"lr transfer: not checked ({result.lr_transfer_note})")
    if result.allocation:
        a = result.allocation
        params_span, tokens_span = ("-" if e.low is None else f"[{sci(e.low)}, {sci(e.high)}]" for e in (a.params, a.tokens))
        lines.append(f"for C = {sci(a.budget_flops)} FLOPs: N = {sci(a.params.value)} params {params_span}, "
                     f"D = {sci(a.tokens.value)} tokens {tokens_span}, predicted {result.metric} "
                     f"{a.loss.value:.4g} (95% interval {_interval(a.loss)})")
    lines += [f"caution: {text}" for text in cautions(result)]
    lines.append(f"wrote {result.json_path} and {result.html_path}")
    return lines
