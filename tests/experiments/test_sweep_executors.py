"""The Optuna sampler (ask/tell, a study rebuilt on resume) and the Ray and submitit executors."""

from __future__ import annotations

import pytest

from lmforge.experiments import sweep
from lmforge.experiments.spec import spec_from_dict
from tests.experiments.test_sweep import spec_data

LOG_LR = {"optim.lr": {"low": 1.0e-3, "high": 3.0e-2, "log": True}}


def test_the_optuna_sampler_runs_its_trials_and_a_resumed_sweep_continues_its_study(pretrain_data, tmp_path):
    pytest.importorskip("optuna")
    data = spec_data(tmp_path, pretrain_data["tokens"], sampler="optuna", trials=3, space=LOG_LR,
                     pruner={"kind": "median", "n_startup_trials": 2})
    first = sweep.run(spec_from_dict(data))
    assert [t.status in ("done", "pruned") for t in first.trials] == [True] * 3
    assert all(1.0e-3 <= t.params["optim.lr"] <= 3.0e-2 for t in first.trials)
    assert len({t.params["optim.lr"] for t in first.trials}) == 3
    more = sweep.run(spec_from_dict({**data, "trials": 4}), resume=True)
    assert [t.id for t in more.trials] == ["t0000", "t0001", "t0002", "t0003"]
    assert [t.params for t in more.trials[:3]] == [t.params for t in first.trials]
    assert [t.attempts for t in more.trials] == [1, 1, 1, 1] and more.trials[3].status in ("done", "pruned")


@pytest.mark.slow
def test_the_ray_executor_runs_trials_as_tasks_on_a_local_runtime(pretrain_data, tmp_path):
    pytest.importorskip("ray")
    result = sweep.run(spec_from_dict(spec_data(tmp_path, pretrain_data["tokens"], executor={
        "kind": "ray", "max_parallel": 2, "poll_seconds": 0.2})))
    assert [t.status for t in result.trials] == ["done", "done"]
    assert all(t.metrics["tokens"] == 8 * 256 for t in result.trials)


@pytest.mark.slow
def test_the_submitit_executor_runs_trials_as_local_jobs(pretrain_data, tmp_path):
    pytest.importorskip("submitit")
    result = sweep.run(spec_from_dict(spec_data(tmp_path, pretrain_data["tokens"], space={
        "optim.lr": {"values": [3.0e-3]}}, executor={"kind": "submitit", "poll_seconds": 0.2,
                                                      "submitit": {"cluster": "local", "timeout_min": 5}})))
    assert [t.status for t in result.trials] == ["done"]
    assert (result.dir / "submitit").is_dir()


def test_the_median_pruner_stops_a_trial_behind_the_recorded_ones_and_lets_a_better_one_run(pretrain_data, tmp_path):
    pytest.importorskip("optuna")
    from lmforge.experiments.samplers import make_sampler
    from lmforge.experiments.sweep_dir import TrialRecord

    spec = spec_from_dict(spec_data(tmp_path, pretrain_data["tokens"], sampler="optuna", trials=4, space=LOG_LR,
                                    pruner={"kind": "median", "n_startup_trials": 2}))
    recorded = [TrialRecord(f"t000{i}", i, {"optim.lr": lr}, [], status="done", metric=loss)
                for i, (lr, loss) in enumerate([(2e-3, 2.5), (4e-3, 2.6)])]
    curves = {"t0000": [(2, 3.0), (4, 2.5)], "t0001": [(2, 3.1), (4, 2.6)]}  # what a resumed sweep reads back
    sampler = make_sampler(spec, recorded, curves)
    behind, ahead = (TrialRecord(f"t000{n}", n, sampler.ask(n), []) for n in (2, 3))
    for record in (behind, ahead):
        sampler.start(record)
    assert sampler.report(behind, 2, 5.0)  # far above the median of the finished trials at step 2
    assert not sampler.report(ahead, 2, 2.9) and not sampler.report(ahead, 4, 2.4)
