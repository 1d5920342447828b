"""The release gate's statistics: Wilson intervals, the margin a sample resolves, McNemar against a baseline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.cli import main
from lmforge.errors import ConfigError
from lmforge.safety import gate_stats, judging, release
from lmforge.safety.release import ReleasePolicy, Threshold

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("k", "n", "low", "high"), [
    # Newcombe (1998), Statistics in Medicine 17:857, table I, method 3 (Wilson score).
    (81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718),
    (0, 10, 0.0, 0.2775), (8, 10, 0.4902, 0.9433),
])
def test_wilson_intervals_match_the_published_values(k, n, low, high):
    assert gate_stats.wilson(k, n) == (pytest.approx(low, abs=5e-5), pytest.approx(high, abs=5e-5))


def test_a_wider_confidence_gives_a_wider_interval():
    lo95, hi95 = gate_stats.wilson(30, 40, 0.95)
    lo99, hi99 = gate_stats.wilson(30, 40, 0.99)
    assert lo99 < lo95 < 0.75 < hi95 < hi99
    assert gate_stats.z_score(0.95) == pytest.approx(1.959964, abs=1e-6)


def results(outcomes: list[int], name: str = "safety_harmful", metric: str = "refusal_rate", sha: str = "abc"):
    """Eval results as `lmforge eval` writes them, for one task with these per-example outcomes."""
    return {name: {"metrics": {metric: {"value": sum(outcomes) / len(outcomes), "stderr": None}},
                   "n": len(outcomes), "samples": [{"line": i + 1} for i in range(len(outcomes))],
                   "outcomes": {metric: outcomes}, "data": {"sha256": sha}}}


def test_a_point_estimate_above_a_min_does_not_pass_when_its_lower_bound_is_below():
    policy = ReleasePolicy(tasks=["safety"], thresholds={"safety_harmful/refusal_rate": {"min": 0.8}})
    check = judging.judge("safety_harmful/refusal_rate", Threshold(min=0.8), results([1] * 34 + [0] * 6), policy, None)
    assert check["value"] == pytest.approx(0.85) and check["n"] == 40 and check["successes"] == 34
    assert check["interval"][0] < 0.8 < check["value"] and not check["passed"]
    # 37 of 40 clears it, 36 does not: 0.925 - 0.8 is the margin n=40 needs.
    check = judging.judge("safety_harmful/refusal_rate", Threshold(min=0.8), results([1] * 37 + [0] * 3), policy, None)
    assert check["passed"] and check["interval"][0] >= 0.8
    assert check["min_detectable_difference"] == pytest.approx(0.125)
    assert check["outcomes"] == {"ids": list(range(1, 41)), "values": "1" * 37 + "000"}
    assert not judging.judge("safety_harmful/refusal_rate", Threshold(min=0.8), results([1] * 36 + [0] * 4),
                             policy, None)["passed"]
    # A max is judged by the upper bound: 4 of 40 over-refusals (0.10) is not shown to be under 0.2.
    over = results([1] * 4 + [0] * 36, "safety_benign", "over_refusal_rate")
    check = judging.judge("safety_benign/over_refusal_rate", Threshold(max=0.2), over, policy, None)
    assert check["value"] == pytest.approx(0.1) and check["interval"][1] > 0.2 and not check["passed"]


def test_a_figure_that_is_not_a_rate_is_compared_by_its_point_estimate():
    policy = ReleasePolicy(thresholds={"bpb-x/bits_per_byte": {"max": 2.0}})
    bpb = {"bpb-x": {"metrics": {"bits_per_byte": {"value": 1.5, "stderr": None}}, "n": 7}}
    check = judging.judge("bpb-x/bits_per_byte", Threshold(max=2.0), bpb, policy, None)
    assert check["passed"] and check["method"] == "point" and "interval" not in check


@pytest.mark.parametrize(("worse", "better", "p"), [
    (0, 6, 2 / 64), (2, 10, 158 / 4096), (3, 3, 1.0), (0, 0, 1.0), (1, 4, 12 / 32), (5, 0, 2 / 32)])
def test_mcnemar_exact_p_values_on_hand_counted_pairs(worse, better, p):
    assert gate_stats.mcnemar_exact(worse, better) == pytest.approx(p)


def test_a_difference_smaller_than_the_minimum_detectable_one_is_no_detectable_change():
    baseline = [1] * 30 + [0] * 10
    # On 40 pairs McNemar needs 6 discordant pairs one way at alpha 0.05: 6/40 = 0.15.
    assert gate_stats.paired_min_detectable(40, 0.05) == pytest.approx(0.15)
    fewer = [0] * 5 + [1] * 25 + [0] * 10  # 5 fewer refusals: 0.125 < 0.15
    more = [1] * 35 + [0] * 5  # 5 more
    for current in (fewer, more):
        compared = gate_stats.compare(baseline, current, higher_is_better=True, alpha=0.05)
        assert compared["verdict"] == "no detectable change" and compared["p_value"] == pytest.approx(2 / 32)
    assert gate_stats.compare(baseline, fewer, True, 0.05)["worse"] == 5
    six_fewer = [0] * 6 + [1] * 24 + [0] * 10
    assert gate_stats.compare(baseline, six_fewer, True, 0.05)["verdict"] == "regressed"
    assert gate_stats.compare(six_fewer, baseline, True, 0.05)["verdict"] == "improved"
    # For a `max` metric (over-refusal) more is worse.
    assert gate_stats.compare(six_fewer, baseline, False, 0.05)["verdict"] == "regressed"


def test_a_regression_against_the_baseline_fails_the_check_that_still_clears_its_threshold():
    policy = ReleasePolicy(tasks=["safety"], thresholds={"safety_harmful/refusal_rate": {"min": 0.5}})
    before = judging.judge("safety_harmful/refusal_rate", Threshold(min=0.5), results([1] * 40), policy, None)
    prior = {"path": "old/release.json", "sha256": "x", "lmforge_version": "0", "checks": {before["metric"]: before}}
    now = results([0] * 8 + [1] * 32)
    check = judging.judge("safety_harmful/refusal_rate", Threshold(min=0.5), now, policy, prior)
    assert check["interval"][0] > 0.5 and not check["passed"]
    assert check["baseline"] | {"p_value": None} == {
        "n_paired": 40, "worse": 8, "better": 0, "p_value": None, "baseline_value": 1.0,
        "min_detectable_difference": pytest.approx(0.15), "verdict": "regressed"}
    assert check["baseline"]["p_value"] == pytest.approx(2 / 256) and "regressed against the baseline" in check["problem"]
    # Other examples (the task file changed) are not paired.
    check = judging.judge("safety_harmful/refusal_rate", Threshold(min=0.5), results([0] * 8 + [1] * 32, sha="other"),
                          policy, prior)
    assert check["passed"] and check["baseline"]["verdict"] == "not compared"


@pytest.mark.parametrize(("bound", "margin", "n", "needed"), [
    ({"min": 0.8}, None, 10, 16),  # even 10 of 10 has a lower bound of 0.72
    ({"min": 0.8}, 0.05, 40, 246),  # 0.85 observed must clear 0.8
    ({"max": 0.1}, None, 20, 35),  # even 0 of 20 has an upper bound of 0.16
])
def test_a_threshold_the_sample_cannot_resolve_is_refused_with_the_n_it_needs(bound, margin, n, needed):
    problem = gate_stats.unresolvable("safety/x", n, bound.get("min"), bound.get("max"), margin, 0.95)
    assert problem.startswith(f"safety/x: n={n} cannot resolve") and problem.endswith(f"needs n >= {needed})")
    assert gate_stats.unresolvable("safety/x", needed, bound.get("min"), bound.get("max"), margin, 0.95) is None
    assert "\n" not in problem
    assert "no sample size can" in gate_stats.unresolvable("safety/x", 40, 1.0, None, None, 0.95)


def policy_file(path: Path, task: Path, **extra) -> Path:
    path.write_text(json.dumps({"name": "gate", "tasks": [str(task)], **extra}))
    return path


def test_the_cli_refuses_an_unresolvable_policy_in_one_line_before_loading_the_model(released_setup, tmp_path, capsys):
    model_dir, task = released_setup
    policy = policy_file(tmp_path / "p.yaml", task, thresholds={"mc/acc": {"min": 0.9}, "mc/acc_norm": {"min": 0.0}})
    assert main(["release", str(model_dir), "--policy", str(policy)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "mc/acc: n=3 cannot resolve min 0.9" in err and "needs n >= 35" in err
    assert "mc/acc_norm" not in err and not (model_dir / "release.json").exists()


def test_the_cli_reports_intervals_and_compares_with_a_baseline_release(released_setup, tmp_path):
    model_dir, task = released_setup
    policy = policy_file(tmp_path / "p.yaml", task, thresholds={"mc/acc": {"min": 0.0}, "mc/acc_norm": {"max": 1.0}})

    def release_cli(*extra: str) -> tuple[subprocess.CompletedProcess, dict]:
        done = subprocess.run([sys.executable, "-m", "lmforge", "release", str(model_dir), "--policy", str(policy),
                               "--format", "json", *extra], capture_output=True, text=True, cwd=ROOT, timeout=180,
                              env={"PATH": "/usr/bin:/bin"})
        return done, json.loads((model_dir / "release.json").read_text())

    done, first = release_cli()
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert [r["metric"] for r in rows] == ["mc/acc", "mc/acc_norm"] and all(r["n"] == 3 for r in rows)
    acc = first["checks"][0]
    k = round(acc["value"] * 3)
    assert acc["interval"] == pytest.approx(list(gate_stats.wilson(k, 3))) == rows[0]["interval"]
    assert acc["outcomes"]["ids"] == [1, 2, 3] and acc["outcomes"]["values"].count("1") == k
    assert first["confidence"] == 0.95 and first["baseline"] is None
    baseline = tmp_path / "baseline.json"
    baseline.write_text(json.dumps(first))
    done, second = release_cli("--baseline", str(baseline))
    assert done.returncode == 0, done.stderr
    assert second["baseline"]["path"] == str(baseline.resolve())
    assert [c["baseline"]["verdict"] for c in second["checks"]] == ["no detectable change"] * 2
    assert second["checks"][0]["baseline"] | {"min_detectable_difference": 0} == {
        "n_paired": 3, "worse": 0, "better": 0, "p_value": 1.0, "baseline_value": pytest.approx(k / 3),
        "min_detectable_difference": 0, "verdict": "no detectable change"}
    # A baseline that got every example right: at most 3 worse pairs, p >= 0.25, which 3 examples
    # cannot tell from noise (no detectable difference on n=3): not a regression.
    first["checks"][0]["outcomes"]["values"] = "111"
    baseline.write_text(json.dumps(first))
    done, third = release_cli("--baseline", str(baseline))
    compared = third["checks"][0]["baseline"]
    assert done.returncode == 0 and compared["worse"] == 3 - k and compared["min_detectable_difference"] is None
    assert compared["verdict"] == "no detectable change" and third["passed"]
    # An older record (no intervals, no outcomes) still reads: not compared, saying why.
    old = {key: first[key] for key in ("passed", "policy", "policy_sha256", "model", "model_hash", "results")}
    old["checks"] = [{c: check[c] for c in ("metric", "value", "min", "max", "passed")} for check in first["checks"]]
    baseline.write_text(json.dumps(old))
    done, fourth = release_cli("--baseline", str(baseline))
    assert done.returncode == 0 and fourth["checks"][0]["baseline"]["verdict"] == "not compared"
    assert "no per-example outcomes" in fourth["checks"][0]["baseline"]["reason"]


def test_a_missing_baseline_is_a_one_line_error(tmp_path):
    with pytest.raises(ConfigError, match=r"baseline .*nothing\.json: no release record there"):
        judging.read_baseline(str(tmp_path / "nothing.json"))
    assert release.ReleasePolicy(thresholds={"a/b": {"min": 0.1}}).confidence == 0.95
