"""TrainingRun: the sections the trainer reads, declared once for every training verb."""

from __future__ import annotations

from lmforge.align.config import AlignConfig
from lmforge.config import load_config
from lmforge.train.config import TrainConfig, TrainingRun


def test_pretraining_and_fine_tuning_configs_have_every_trainer_section_from_one_base():
    shared = set(TrainingRun.model_fields)
    assert {"run", "optim", "schedule", "train", "parallel", "faults", "alerts", "trackers"} <= shared
    for verb in (TrainConfig, AlignConfig):
        assert issubclass(verb, TrainingRun)
        assert shared <= set(verb.model_fields)


def test_fine_tuning_keeps_its_own_section_defaults_under_a_one_key_override(tmp_path):
    config = load_config(AlignConfig, overrides=["model=somewhere", f"data.train={tmp_path / 'x.jsonl'}",
                                                 "train.log_every=3"])
    assert (config.train.max_steps, config.train.log_every, config.optim.lr) == (200, 3, 1e-4)
    assert config.run.name == "align" and config.faults == TrainingRun().faults
