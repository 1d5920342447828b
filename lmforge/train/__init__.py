"""Pretraining: config, loop, optimizers, schedules, checkpoints, device/parallel setup."""
