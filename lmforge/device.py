"""Devices and dtypes, each in one vocabulary, plus the autocast and compile helpers that
train, eval, serve and the benchmarks share.

Devices: `auto`, `cpu`, `cuda`, `cuda:N` (and whatever else torch names). Dtypes: torch's
names (`float32`, `bfloat16`, `float16`); the short names training configs have always used
(`fp32`, `bf16`, `fp16`) are accepted as input and resolved through the same table. Asking
for a device this machine lacks, or a dtype it cannot run, is a user error (one line,
exit 2), not a traceback from deep inside torch.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Literal

import torch

from lmforge.errors import ConfigError

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# Every dtype spelling a config accepts ("auto": the stage's recommended choice).
DtypeName = Literal["auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16"]


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


def rank_device(name: str, local_rank: int, key: str = "train.device") -> torch.device:
    """A training rank's device: `cuda` (or `auto` where CUDA is present) -> cuda:LOCAL_RANK
    (modulo this node's GPUs), else cpu."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key}=cuda but no CUDA device is available (allowed: auto, cpu)")
    use_cuda = name == "cuda" or (name == "auto" and torch.cuda.is_available())
    return torch.device("cuda", local_rank % torch.cuda.device_count()) if use_cuda else torch.device("cpu")


# ------------------------------------------------------------------------------ dtypes


def dtype(name: str, key: str = "dtype") -> torch.dtype:
    """The torch dtype a name stands for (either spelling); `auto` is the caller's to resolve."""
    canonical = ALIASES.get(name, name)
    if canonical not in DTYPES:
        allowed = ", ".join([*DTYPES, *ALIASES])
        raise ConfigError(f"{key}={name!r} is not a dtype (allowed: {allowed})")
    return DTYPES[canonical]


def dtype_name(value: torch.dtype) -> str:
    """torch's name of a dtype (`bfloat16`): what a config, a card and HF's config.json write."""
    return str(value).removeprefix("torch.")


def stored_or(name: str, key: str = "dtype") -> torch.dtype | None:
    """Loading a model: `auto` -> None (keep the dtype it is stored in), else the named dtype."""
    return None if name == "auto" else dtype(name, key)


def cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16 make bf16 matmuls several times faster than fp32 on CPU."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability in ("AVX512_BF16", "AMX"):
        return True
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def compute_dtype(name: str, device: torch.device, key: str = "train.dtype") -> torch.dtype:
    """Training's matmul dtype (weights stay fp32): `auto` -> bf16 where the device has fast
    bf16 matmuls, else fp32; bf16 on a GPU without it is refused."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    chosen = dtype(name, key)
    if chosen == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"{key}={name} but this GPU has no bf16 support (allowed: fp32)")
    return chosen


def inference_dtype(name: str, device: torch.device, key: str = "engine.dtype") -> torch.dtype:
    """Serving's weight dtype: `auto` -> bf16 on CUDA, fp32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return dtype(name, key)


def log_choice(key: str, requested: str, device: torch.device, dtype: torch.dtype) -> None:
    """One INFO line saying where a verb runs and in which dtype: `eval.device=auto: cuda:0, bfloat16`."""
    log.info("%s=%s: running on %s in %s", key, requested, device, dtype_name(dtype))


# ------------------------------------------------------------------------- autocast, compile


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision: weights and optimizer state stay fp32, matmuls run in `dtype`."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def compile_unavailable(device: torch.device) -> str | None:
    """Why torch.compile cannot run here (e.g. no C++ compiler for inductor on CPU), or None."""
    try:
        probe = torch.compile(lambda x: x * 2 + 1)
        probe(torch.ones(4, device=device))
    except Exception as err:  # noqa: BLE001 - any failure means: run without it
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        return f"{type(err).__name__}: {first}"
    return None
