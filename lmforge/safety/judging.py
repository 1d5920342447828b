"""How the release gate judges one check: a rate by its Wilson interval (not its point estimate),
the margin the sample can resolve, and, against a previous release, McNemar's exact test on
the per-example outcomes both records keep.

A check in release.json keeps the fields older records had (`metric`, `value`, `min`, `max`,
`passed`, `problem`) and adds `method` ("wilson", or "point" for a figure that is not a rate
of examples, such as bits per byte), `n`, `successes`, `interval` ([low, high]),
`confidence`, `min_detectable_difference` (how far from its threshold an observed rate must
be to pass on n examples; null when no outcome can), `data_sha256`, `outcomes`
({"ids": example keys, "values": "0110..."}) and, with a baseline, `baseline`
({verdict, p_value, worse, better, n_paired, baseline_value, min_detectable_difference}).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmforge.errors import ConfigError
from lmforge.safety import gate_stats
from lmforge.store import hashes

if TYPE_CHECKING:
    from lmforge.safety.release import ReleasePolicy, Threshold


def read_baseline(path: str) -> dict[str, Any]:
    """A previous release record: {path, sha256, checks by metric, lmforge_version}."""
    file = Path(path)
    if file.is_dir():
        file = file / "release.json"
    if not file.is_file():
        raise ConfigError(f"baseline {path}: no release record there")
    try:
        record = json.loads(file.read_text(encoding="utf-8"))
        checks = {c["metric"]: c for c in record["checks"]}
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise ConfigError(f"baseline {file}: not a release record (release.json with checks)") from None
    return {"path": str(file.resolve()), "sha256": hashes.sha256_file(file), "checks": checks,
            "lmforge_version": record.get("lmforge_version", "?")}


def _margin(policy: ReleasePolicy, bound: Threshold) -> float | None:
    return bound.margin if bound.margin is not None else policy.margin


def refuse_unresolvable(policy: ReleasePolicy, sizes: dict[str, int]) -> None:
    """ConfigError, before any model is loaded, for checks of tasks of `sizes` (name: examples
    the gate will score) whose sample cannot resolve their threshold: one line, naming each
    check and the n it needs."""
    problems = []
    for key, bound in policy.thresholds.items():
        n = sizes.get(key.rpartition("/")[0])
        if n is not None:
            problem = gate_stats.unresolvable(key, n, bound.min, bound.max, _margin(policy, bound), policy.confidence)
            problems += [problem] if problem else []
    if problems:
        raise ConfigError("release policy refused: " + "; ".join(problems))


def _measured(key: str, results: dict[str, Any]) -> dict[str, Any] | None:
    """The metric's value, n, successes and per-example outcomes, from the eval results."""
    task, _, metric = key.rpartition("/")
    result = results.get(task)
    if result is None or metric not in result.get("metrics", {}):
        return None
    value, n = result["metrics"][metric]["value"], result.get("n")
    found: dict[str, Any] = {"value": value, "n": n, "successes": None, "outcomes": None,
                             "data_sha256": (result.get("data") or {}).get("sha256")}
    outcomes = (result.get("outcomes") or {}).get(metric)
    samples = result.get("samples") or []
    if outcomes is not None:
        ids = [s.get("line", i) for i, s in enumerate(samples)] if len(samples) == len(outcomes) else list(range(len(outcomes)))
        found.update(n=len(outcomes), successes=sum(outcomes),
                     outcomes={"ids": ids, "values": "".join(str(int(o)) for o in outcomes)})
    elif isinstance(n, int) and n > 0 and 0 <= value <= 1 and abs(value * n - round(value * n)) < 1e-6:
        found["successes"] = round(value * n)  # a rate over n examples (e.g. the harness's acc)
    return found


def judge(key: str, bound: Threshold, results: dict[str, Any], policy: ReleasePolicy,
          prior: dict[str, Any] | None) -> dict[str, Any]:
    """One check of the release record (see the module docstring for its fields)."""
    check: dict[str, Any] = {"metric": key, "value": None, "min": bound.min, "max": bound.max, "passed": False}
    found = _measured(key, results)
    if found is None:
        return {**check, "problem": "not measured by the policy's tasks"}
    value, n, k = found["value"], found["n"], found["successes"]
    check["value"] = value
    if k is None:  # not a rate of examples: the point estimate against the bounds
        check["passed"] = (bound.min is None or value >= bound.min) and (bound.max is None or value <= bound.max)
        return {**check, "method": "point", "n": n}
    confidence = policy.confidence
    lo, hi = gate_stats.wilson(k, n, confidence)
    check.update(method="wilson", n=n, successes=k, interval=[lo, hi], confidence=confidence,
                 min_detectable_difference=gate_stats.min_detectable(n, bound.min, bound.max, confidence),
                 data_sha256=found["data_sha256"], outcomes=found["outcomes"])
    check["passed"] = gate_stats.passes(k, n, bound.min, bound.max, confidence)
    problem = gate_stats.unresolvable(key, n, bound.min, bound.max, _margin(policy, bound), confidence)
    if problem:
        check.update(passed=False, problem=problem)
    if prior is not None:
        check["baseline"] = _against(check, prior, higher_is_better=bound.min is not None, alpha=1 - confidence)
        if check["baseline"]["verdict"] == "regressed" and policy.fail_on_regression:
            check["passed"] = False
            check.setdefault("problem", f"regressed against the baseline (p={check['baseline']['p_value']:.3g})")
    return check


def _against(check: dict[str, Any], prior: dict[str, Any], higher_is_better: bool, alpha: float) -> dict[str, Any]:
    """McNemar's exact test of this check's outcomes against the baseline's, paired by example."""
    before = prior["checks"].get(check["metric"])
    if before is None:
        return {"verdict": "not compared", "reason": "the baseline has no such check"}
    if not before.get("outcomes") or not check.get("outcomes"):
        return {"verdict": "not compared", "reason": "no per-example outcomes in the baseline "
                f"(lmforge {prior['lmforge_version']}) or in this run"}
    if before.get("data_sha256") != check.get("data_sha256"):
        return {"verdict": "not compared", "reason": "the baseline was measured on other examples (task file changed)"}
    old = dict(zip(before["outcomes"]["ids"], before["outcomes"]["values"], strict=True))
    new = dict(zip(check["outcomes"]["ids"], check["outcomes"]["values"], strict=True))
    common = [i for i in new if i in old]
    if not common:
        return {"verdict": "not compared", "reason": "no example in common with the baseline"}
    return gate_stats.compare([int(old[i]) for i in common], [int(new[i]) for i in common], higher_is_better, alpha)
