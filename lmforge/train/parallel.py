"""Compilation, activation checkpointing and data parallelism (DDP or FSDP2), applied to the model from outside (torchtitan style): the model file holds none of it.

Order matters and follows torchtitan: activation checkpointing wraps each block, then
torch.compile compiles each (wrapped) block, then DDP or FSDP2 wraps the whole. State-dict
keys stay those of the bare model (DCP's state_dict helpers strip the wrappers' prefixes),
so a checkpoint does not depend on how the run that wrote it was parallelised.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING

import torch
from torch import nn

from lmforge.device import compile_unavailable
from lmforge.errors import ConfigError

if TYPE_CHECKING:
    from lmforge.model import ModelConfig
    from lmforge.train.config import LoopConfig, ParallelConfig
    from lmforge.train.distributed import DistEnv
    from lmforge.train.objective import Objective

log = logging.getLogger(__name__)


# On a 2-core CPU, compiling each block costs 10-15 s, makes a step 0-16% faster and cuts peak
# memory by 20-27% (BENCHMARKS.md, "Compile by default"). `train.compile: auto` compiles there when
# a step is big enough for that to pay back within about 100 steps: at least AUTO_COMPILE_MIN_STEP_FLOPS
# of training a step (the 50m preset at 2,048 tokens a step and up; the quickstart's model stays
# eager). It depends on the step, not on max_steps, so that a resumed or a longer run of the
# same config computes the same numbers.
AUTO_COMPILE_MIN_STEP_FLOPS = 3e11


def compile_decision(setting: bool | str, device: torch.device, kind: str, step_flops: float,
                     moe: bool = False) -> tuple[bool, str]:
    """Whether to compile the blocks, and why (for the log). `kind`: the objective's; `step_flops`:
    training FLOPs of one optimizer step (tokens/step x FLOPs/token)."""
    if setting is not True and setting is not False and setting != "auto":
        raise ConfigError(f"train.compile must be true, false or auto, got {setting!r}")
    if setting != "auto":
        return bool(setting), f"train.compile={str(setting).lower()}"
    if kind != "pretrain":
        return False, f"train.compile=auto: eager for {kind} (its batches change shape from step to step)"
    if device.type == "cuda":
        return True, "train.compile=auto: pretraining on CUDA"
    if moe:
        return False, "train.compile=auto: eager for a mixture-of-experts model on CPU (compiled MoE not measured there)"
    if step_flops < AUTO_COMPILE_MIN_STEP_FLOPS:
        return False, (f"train.compile=auto: eager on CPU for steps of {step_flops / 1e12:.2f} TFLOP "
                       f"(compiling pays back from {AUTO_COMPILE_MIN_STEP_FLOPS / 1e12:.2f})")
    return True, f"train.compile=auto: steps of {step_flops / 1e12:.2f} TFLOP on CPU"


def decide_compile(loop: LoopConfig, device: torch.device, objective: Objective, model_config: ModelConfig) -> bool:
    """`compile_decision` for a run, logged."""
    step_flops = objective.tokens_per_step * model_config.flops_per_token(objective.seq_len)
    compile_blocks, why = compile_decision(loop.compile, device, objective.kind, step_flops, moe=model_config.moe is not None)
    log.info("%s: %s", why, "compiling each block" if compile_blocks else "eager")
    return compile_blocks


def apply_compile(model: nn.Module) -> None:
    """Compile each block separately: shorter compile time and reuse across identical blocks."""
    # Module.compile() compiles in place, so state-dict keys (and checkpoints) are unchanged.
    for block in model.layers:
        block.compile()
    log.info("compiled %d blocks with torch.compile", len(model.layers))


def apply_activation_checkpointing(model: nn.Module, mode: str, every: int = 1) -> int:
    """Recompute blocks' activations in backward instead of keeping them: `full` every block,
    `selective` every `every`-th one (torchtitan's per-layer selective AC). Returns how many."""
    if mode == "none":
        return 0
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    step = 1 if mode == "full" else every
    wrapped = 0
    for i, block in enumerate(model.layers):
        if i % step == step - 1 or step == 1:
            # Non-reentrant checkpointing: works with compile and FSDP2, keeps kwargs.
            model.layers[i] = checkpoint_wrapper(block, preserve_rng_state=False)
            wrapped += 1
    log.info("activation checkpointing (%s) on %d of %d blocks", mode, wrapped, len(model.layers))
    return wrapped


def apply_fsdp(model: nn.Module, dtype: torch.dtype, reshard_after_forward: bool) -> None:
    """FSDP2: each block is its own unit (gathered just before use, freed after), then the
    root holds the embeddings, final norm and head. With bf16, parameters are gathered in
    bf16 and gradients reduced in fp32 (sharded master weights stay fp32)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype != torch.float32 else None
    kwargs = {"mp_policy": policy} if policy is not None else {}
    last = len(model.layers) - 1
    for i, block in enumerate(model.layers):
        # The last block's weights are needed again at once by backward: keep them gathered.
        fully_shard(block, reshard_after_forward=reshard_after_forward and i < last, **kwargs)
    fully_shard(model, reshard_after_forward=False, **kwargs)


def parallelize(
    model: nn.Module, config: ParallelConfig, env: DistEnv, dtype: torch.dtype, compile: bool = False
) -> nn.Module:
    """Apply activation checkpointing, compile and the data-parallel strategy to `model`
    (already on env.device); return the module the loop calls."""
    if config.strategy == "single" and env.world_size > 1:
        raise ConfigError(
            f"{env.world_size} processes but parallel.strategy=single (allowed with several: ddp, fsdp)"
        )
    apply_activation_checkpointing(model, config.activation_checkpointing, config.activation_checkpointing_every)
    if compile:
        reason = compile_unavailable(env.device)
        if reason is None:
            apply_compile(model)
        else:
            log.warning("train.compile: torch.compile is unavailable here (%s): training without it", reason)
    if config.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [env.device.index] if env.device.type == "cuda" else None
        # No buffer broadcast: RoPE tables are derived, MoE expert biases move identically on every
        # rank, and each rank's expert-load counts are its own until the step sums them.
        return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)
    if config.strategy == "fsdp":
        apply_fsdp(model, dtype, config.reshard_after_forward)
    return model


def gradient_sync(model: nn.Module, enabled: bool):
    """Reduce gradients only on a step's last micro-batch: DDP's no_sync, FSDP2's flag."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)
        return contextlib.nullcontext()
    if hasattr(model, "no_sync") and not enabled:  # DDP
        return model.no_sync()
    return contextlib.nullcontext()


def inner_model(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (FSDP2 shards in place and has none)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def grad_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """Global L2 norm of the gradients; with FSDP2's sharded (DTensor) gradients, over all shards."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norm = torch.nn.utils.get_total_norm(grads, 2.0)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def clip_gradients(params: list[torch.Tensor], max_norm: float, norm: torch.Tensor) -> None:
    if max_norm > 0 and max_norm != float("inf"):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)


def unwrap(model: nn.Module) -> nn.Module:
    """The lmforge Transformer inside DDP and/or a peft wrapper (its LoRA layers stay active)."""
    model = inner_model(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model
