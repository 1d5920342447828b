from lmforge.train.config import ScheduleConfig
from lmforge.train.schedules import lr_factor


def test_warmup_rises_linearly_to_the_peak():
    config = ScheduleConfig(name="cosine", warmup_steps=10)
    assert [round(lr_factor(s, 100, config), 3) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]


def test_cosine_decays_to_the_floor_at_the_last_step():
    config = ScheduleConfig(name="cosine", warmup_steps=0, min_lr_ratio=0.1)
    assert lr_factor(0, 100, config) == 1.0
    assert abs(lr_factor(50, 100, config) - 0.55) < 1e-9
    assert abs(lr_factor(100, 100, config) - 0.1) < 1e-9


def test_wsd_holds_the_peak_then_decays_linearly_over_the_last_fraction():
    config = ScheduleConfig(name="wsd", warmup_steps=0, decay_fraction=0.2, min_lr_ratio=0.0)
    assert lr_factor(79, 100, config) == 1.0
    assert abs(lr_factor(90, 100, config) - 0.5) < 1e-9
    assert lr_factor(100, 100, config) == 0.0
