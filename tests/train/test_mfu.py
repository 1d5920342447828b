"""MFU's denominator: a known GPU's datasheet peak, otherwise the measured matmul peak, and which it is."""

from __future__ import annotations

import pytest
import torch

from lmforge.train import mfu


@pytest.mark.parametrize(
    ("device_name", "dtype", "expected"),
    [
        ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989e12),
        ("NVIDIA H100 80GB HBM3", torch.float32, 989e12 / 2),  # the dense TF32 peak
        ("NVIDIA A100-SXM4-80GB", torch.bfloat16, 312e12),  # A100, not A10
        ("NVIDIA A10", torch.bfloat16, 125e12),
    ],
)
def test_a_known_gpu_is_measured_against_its_datasheet_peak(monkeypatch, device_name, dtype, expected):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: device_name)
    assert mfu.peak_flops_basis(torch.device("cuda"), dtype) == (expected, mfu.DATASHEET)
    assert mfu.peak_flops(torch.device("cuda"), dtype) == expected


def test_a_device_without_a_datasheet_entry_says_its_peak_was_measured(monkeypatch):
    monkeypatch.setattr(mfu, "measured_matmul_peak", lambda device_type, dtype: 2.5e12)
    assert mfu.peak_flops_basis(torch.device("cpu"), torch.bfloat16) == (2.5e12, mfu.MEASURED)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    assert mfu.peak_flops_basis(torch.device("cuda"), torch.bfloat16) == (2.5e12, mfu.MEASURED)
    assert mfu.MEASURED == "measured matmul peak"  # the words BENCHMARKS.md's tables use
