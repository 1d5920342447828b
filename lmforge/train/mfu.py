"""Peak matmul throughput of the device, for model FLOPs utilisation (MFU).

MFU is reported against the vendor's datasheet peak where lmforge knows the device (the GPUs
below) and against this machine's measured matmul peak elsewhere (CPUs); the two are not
comparable, so every figure says which it is (`peak_flops_basis`).
"""

from __future__ import annotations

import functools
import time

import torch

# Dense bf16 peak (no sparsity) from the vendors' datasheets; half of it is the dense TF32 peak.
GPU_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "4090": 165e12}

DATASHEET = "datasheet peak"
MEASURED = "measured matmul peak"


@functools.lru_cache(maxsize=8)
def measured_matmul_peak(device_type: str, dtype: torch.dtype, size: int = 2048, seconds: float = 0.5) -> float:
    """Best observed FLOP/s of a square matmul: this machine's practical ceiling."""
    a = torch.randn(size, size, dtype=dtype, device=device_type)
    b = torch.randn(size, size, dtype=dtype, device=device_type)
    a @ b
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        if device_type == "cuda":
            torch.cuda.synchronize()
        best = max(best, 4 * 2 * size**3 / (time.perf_counter() - start))
    return best


def peak_flops_basis(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """The FLOP/s that MFU divides by, and what it is: DATASHEET (a known GPU) or MEASURED."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAK_BF16.items():  # A100 before A10: the first match wins
            if key in name:
                return (value if dtype != torch.float32 else value / 2), DATASHEET
    return measured_matmul_peak(device.type, dtype), MEASURED


def peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    return peak_flops_basis(device, dtype)[0]
