"""The GPU path of the trainer: bf16 FSDP2 with compiled blocks and async checkpoints.

Skipped without CUDA; run on a lent GPU machine with `pytest -m gpu`.
"""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.train import trainer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

GPU = {"device": "cuda", "dtype": "bf16", "compile": True, "async_checkpoint": True, "checkpoint_every": 4}
CONSTANT = {"name": "constant", "warmup_steps": 3}


def test_bf16_fsdp_with_compiled_blocks_learns_and_resumes_exactly_from_async_checkpoints(make_config):
    fsdp = {"strategy": "fsdp", "activation_checkpointing": "selective"}
    full = trainer.run(make_config("gpu-full", schedule=CONSTANT, parallel=fsdp, train={**GPU, "max_steps": 30}))
    assert all(math.isfinite(x) for x in full.losses) and full.losses[-1] < full.losses[0] - 0.5
    part = trainer.run(make_config("gpu-part", schedule=CONSTANT, parallel=fsdp, train={**GPU, "max_steps": 12}))
    resumed = trainer.run(make_config("gpu-part", schedule=CONSTANT, parallel=fsdp, train={**GPU, "max_steps": 30}),
                          resume=True)
    assert part.losses + resumed.losses == pytest.approx(full.losses, rel=1e-3)


def test_a_gpu_fsdp_checkpoint_loads_on_cpu_for_inference(make_config):
    from lmforge.store.loading import load_model

    result = trainer.run(make_config("gpu-export", parallel={"strategy": "fsdp"}, train={**GPU, "max_steps": 4}))
    model, _, checkpoint = load_model(result.run_dir)
    assert checkpoint.name == "step-0000004" and next(model.parameters()).device.type == "cpu"
