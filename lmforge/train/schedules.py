"""Learning-rate schedules as multipliers of the peak rate, a pure function of the step."""

from __future__ import annotations

import math

from lmforge.train.config import ScheduleConfig


def lr_factor(step: int, max_steps: int, config: ScheduleConfig) -> float:
    """Linear warmup, then cosine / warmup-stable-decay (Hu et al., 2024) / constant."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    floor = config.min_lr_ratio
    if config.name == "constant":
        return 1.0
    if config.name == "cosine":
        span = max(1, max_steps - config.warmup_steps)
        progress = min(1.0, (step - config.warmup_steps) / span)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    # wsd: hold the peak, then decay linearly to the floor over the last decay_fraction.
    decay_steps = max(1, round(config.decay_fraction * max_steps))
    decay_start = max(config.warmup_steps, max_steps - decay_steps)
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start) / max(1, max_steps - decay_start))
    return 1.0 - (1 - floor) * progress
