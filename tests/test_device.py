"""lmforge.device: one dtype vocabulary (both spellings in, torch's names out), devices that
exist, and the autocast helper."""

from __future__ import annotations

import pytest
import torch

from lmforge import device
from lmforge.errors import ConfigError

CPU = torch.device("cpu")


@pytest.mark.parametrize(("short", "long"), [("bf16", "bfloat16"), ("fp32", "float32"), ("fp16", "float16")])
def test_both_spellings_of_a_dtype_resolve_through_the_one_table(short, long):
    assert device.dtype(short) is device.dtype(long) is getattr(torch, long)
    assert device.dtype_name(device.dtype(short)) == long


def test_an_unknown_dtype_is_a_one_line_error_naming_the_key_and_the_allowed_names():
    with pytest.raises(ConfigError, match=r"serve.dtype='int8' is not a dtype \(allowed: float32, bfloat16"):
        device.dtype("int8", "serve.dtype")


def test_auto_keeps_the_stored_dtype_when_loading_and_picks_fp32_for_serving_on_cpu():
    assert device.stored_or("auto") is None
    assert device.stored_or("bf16") is torch.bfloat16
    assert device.inference_dtype("auto", CPU) is torch.float32
    assert device.inference_dtype("bf16", CPU) is torch.bfloat16


def test_training_compute_dtype_takes_either_spelling():
    assert device.compute_dtype("fp32", CPU) is device.compute_dtype("float32", CPU) is torch.float32
    assert device.compute_dtype("bf16", CPU) is device.compute_dtype("bfloat16", CPU) is torch.bfloat16
    assert device.compute_dtype("auto", CPU) in (torch.float32, torch.bfloat16)


def test_autocast_is_a_no_op_in_fp32_and_casts_matmuls_otherwise():
    a = torch.ones(2, 2)
    with device.autocast(CPU, torch.float32):
        assert (a @ a).dtype is torch.float32
    with device.autocast(CPU, torch.bfloat16):
        assert (a @ a).dtype is torch.bfloat16


def test_a_device_this_machine_lacks_is_a_one_line_error():
    with pytest.raises(ConfigError, match="not a device"):
        device.resolve("nonsense", "engine.device")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            device.resolve("cuda", "engine.device")


def test_auto_is_the_cpu_without_cuda_and_cuda_with_it_and_the_choice_is_one_log_line(monkeypatch, caplog):
    import logging

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device.resolve("auto") == CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert device.resolve("auto") == torch.device("cuda")
    assert device.inference_dtype("auto", device.resolve("auto")) is torch.bfloat16
    caplog.set_level(logging.INFO, logger="lmforge.device")
    device.log_choice("engine.device", "auto", torch.device("cuda", 0), torch.bfloat16)
    assert [r.getMessage() for r in caplog.records] == ["engine.device=auto: running on cuda:0 in bfloat16"]
