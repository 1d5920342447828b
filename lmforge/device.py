"""Devices, in one vocabulary: `auto`, `cpu`, `cuda`, `cuda:N` (and whatever else torch names).

Asking for a device this machine lacks is a user error (one line, exit 2), not a traceback
from deep inside torch.
"""

from __future__ import annotations

import torch

from lmforge.errors import ConfigError


def resolve(name: str | torch.device, key: str = "device") -> torch.device:
    """`auto` -> cuda when available, else cpu; anything else must exist on this machine."""
    if isinstance(name, torch.device):
        name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"{key}={name!r} is not a device (allowed: auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{key}={name} but CUDA is not available on this machine (use auto or cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"{key}={name} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{key}={name} but MPS is not available on this machine (use auto or cpu)")
    return device
