"""The Hugging Face model-dir format: config.json fields and safetensors weight names.

What every decoder shares (vocabulary, widths, RoPE, embedding, final norm, output head,
token ids) is mapped here; what a layer holds is mapped by its block type's layout, which
lives beside the block (lmforge/model/blocks/, e.g. llama_hf.py for Llama, Mistral, Qwen2,
Qwen3, Qwen3-MoE, Dots1 and Mixtral). RoPE is rotate-half, as HF's, so no permutation of the
query/key rows is needed, unlike Meta's original checkpoints.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lmforge import atomic
from lmforge.device import dtype_name
from lmforge.errors import CheckpointError
from lmforge.model.blocks import BlockType, block_for_architecture, block_type, hf_architectures
from lmforge.model.config import ModelConfig, RopeScaling

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"

# ---------------------------------------------------------------------------- config.json


def _layout(config: ModelConfig) -> tuple[BlockType, str]:
    """The block type's HF layout and the architecture this config exports as."""
    block = block_type(config.block)
    if block.hf is None:
        raise CheckpointError(f"block type {config.block!r} has no Hugging Face layout (its file defines none)")
    try:
        return block, block.hf.export_architecture(config)
    except ValueError as err:
        raise CheckpointError(f"cannot export to a Hugging Face layout: {err}") from None


def config_to_hf(config: ModelConfig, dtype: torch.dtype, token_ids: dict[str, int | None]) -> dict[str, Any]:
    """config.json for transformers (4.x and 5.x), vLLM and llama.cpp's converter.

    RoPE is written in the long-standing `rope_theta` / `rope_scaling` form, which every
    reader accepts (transformers 5 converts it to `rope_parameters` on load).
    """
    block, architecture = _layout(config)
    hf: dict[str, Any] = {
        "architectures": [architecture],
        "model_type": block.hf.architectures[architecture],
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": rope_scaling_to_hf(config.rope_scaling),
        "tie_word_embeddings": config.tie_embeddings,
        "attention_dropout": 0.0,
        "initializer_range": config.init_std,
        "use_cache": True,
        "torch_dtype": dtype_name(dtype),
        **token_ids,
    }
    hf.update(block.hf.config_to_hf(config, architecture))
    return hf


def rope_scaling_to_hf(scaling: RopeScaling | None) -> dict[str, Any] | None:
    if scaling is None:
        return None
    if scaling.type == "linear":
        return {"rope_type": "linear", "factor": scaling.factor}
    return {
        "rope_type": "llama3",
        "factor": scaling.factor,
        "low_freq_factor": scaling.low_freq_factor,
        "high_freq_factor": scaling.high_freq_factor,
        "original_max_position_embeddings": scaling.original_max_seq_len,
    }


def _rope_from_hf(hf: dict[str, Any], source: Path) -> tuple[float, RopeScaling | None]:
    # transformers 5 writes `rope_parameters` (theta inside); 4.x `rope_theta` + `rope_scaling`.
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind == "linear":
        return theta, RopeScaling(type="linear", factor=params["factor"])
    if kind == "llama3":
        return theta, RopeScaling(
            type="llama3",
            factor=params["factor"],
            low_freq_factor=params.get("low_freq_factor", 1.0),
            high_freq_factor=params.get("high_freq_factor", 4.0),
            original_max_seq_len=params.get("original_max_position_embeddings", 8192),
        )
    raise CheckpointError(
        f"{source / CONFIG_FILE}: rope scaling {kind!r} is not supported (supported: default, linear, llama3)"
    )


def read_hf_config(directory: Path) -> dict[str, Any]:
    file = directory / CONFIG_FILE
    if not directory.is_dir():
        raise CheckpointError(f"model dir not found: {directory}")
    if not file.is_file():
        raise CheckpointError(f"{directory} is not a Hugging Face model dir (no {CONFIG_FILE})")
    try:
        hf = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{file} is not valid JSON ({err})") from None
    if not isinstance(hf, dict):
        raise CheckpointError(f"{file} must hold a JSON object")
    return hf


def config_from_hf(hf: dict[str, Any], source: Path, max_seq_len: int | None = None) -> ModelConfig:
    """ModelConfig for a config.json of an architecture some block type's layout reads; anything
    else is refused by name, with the architectures lmforge reads."""
    file = source / CONFIG_FILE
    architectures = hf.get("architectures") or []
    architecture = architectures[0] if architectures else f"model_type {hf.get('model_type')!r}"
    block = block_for_architecture(architecture) if architectures else None
    if block is None:
        raise CheckpointError(
            f"{file}: architecture {architecture} is not supported (supported: {', '.join(hf_architectures())})"
        )
    if hf.get("hidden_act", "silu") not in ("silu", "swish"):
        raise CheckpointError(f"{file}: hidden_act {hf['hidden_act']!r} is not supported (only silu)")
    try:
        dim, heads = hf["hidden_size"], hf["num_attention_heads"]
        theta, scaling = _rope_from_hf(hf, source)
        fields: dict[str, Any] = dict(
            block=block.name,
            vocab_size=hf["vocab_size"],
            dim=dim,
            n_layers=hf["num_hidden_layers"],
            n_heads=heads,
            n_kv_heads=hf.get("num_key_value_heads") or heads,
            max_seq_len=hf.get("max_position_embeddings", 2048),
            rope_theta=theta,
            rope_scaling=scaling,
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            init_std=hf.get("initializer_range", 0.02),
        )
        fields.update(block.hf.config_from_hf(hf, architecture))
    except KeyError as err:
        raise CheckpointError(f"{file} lacks the field {err.args[0]!r}") from None
    except ValueError as err:
        raise CheckpointError(f"{file}: {err}") from None
    head_dim = hf.get("head_dim")
    if head_dim and head_dim != dim // heads:
        fields["head_size"] = head_dim
    if max_seq_len is not None:
        fields["max_seq_len"] = max_seq_len
    # A window as long as the context never binds: the layers are plain causal ones.
    if fields.get("sliding_window") is not None and fields["sliding_window"] >= fields["max_seq_len"]:
        fields.pop("sliding_window")
        fields.pop("attention_pattern", None)
    try:
        return ModelConfig(**fields)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise CheckpointError(f"{file}: {where}: {first['msg']}") from None


def token_ids_from_hf(directory: Path) -> dict[str, Any]:
    """bos/eos/pad ids from generation_config.json, else config.json."""
    ids: dict[str, Any] = {}
    for name in (CONFIG_FILE, GENERATION_CONFIG_FILE):
        file = directory / name
        if file.is_file():
            try:
                data = json.loads(file.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise CheckpointError(f"{file} is not valid JSON") from None
            ids.update({k: data[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if data.get(k) is not None})
    return ids


# ------------------------------------------------------------------------------- weights


def state_to_hf(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """lmforge state dict -> HF tensor names; each layer through its block type's layout."""
    block, architecture = _layout(config)
    out = {"model.embed_tokens.weight": state["tok_embeddings.weight"], "model.norm.weight": state["norm.weight"]}
    if not config.tie_embeddings:
        out["lm_head.weight"] = state["output.weight"]
    for i in range(config.n_layers):
        ours = f"layers.{i}."
        layer = {k[len(ours):]: v for k, v in state.items() if k.startswith(ours)}
        try:
            mapped = block.hf.layer_to_hf(layer, config, i, architecture)
        except ValueError as err:  # a learned value the layout has no place for (an expert bias)
            raise CheckpointError(f"cannot export to {architecture}: layer {i}: {err}") from None
        out.update({f"model.layers.{i}.{k}": v for k, v in mapped.items()})
    return out


def state_from_hf(
    tensors: dict[str, torch.Tensor], config: ModelConfig, expected: dict[str, torch.Size], source: Path
) -> dict[str, torch.Tensor]:
    """HF tensors -> lmforge state dict. `expected` maps HF names to the shapes the config implies
    (`state_to_hf` of a meta-device model); every name and shape is checked before conversion."""
    missing = [name for name in expected if name not in tensors]
    if missing:
        raise CheckpointError(f"{source}: weights lack the tensor {missing[0]!r}")
    # Old checkpoints saved RoPE's inverse frequencies (derived from the config); some tied
    # checkpoints store a copy of the embedding as lm_head.
    ignorable = {"lm_head.weight"} if config.tie_embeddings else set()
    unexpected = sorted(k for k in tensors if k not in expected and k not in ignorable and not k.endswith("rotary_emb.inv_freq"))
    if unexpected:
        raise CheckpointError(
            f"{source}: weights hold tensors a {config.n_layers}-layer model of this config lacks: "
            f"{', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''}"
        )
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != tuple(shape):
            raise CheckpointError(
                f"{source}: {name} has shape {tuple(tensors[name].shape)}, config.json implies {tuple(shape)}"
            )
    block, architecture = _layout(config)
    state = {"tok_embeddings.weight": tensors["model.embed_tokens.weight"], "norm.weight": tensors["model.norm.weight"]}
    state["output.weight"] = state["tok_embeddings.weight"] if config.tie_embeddings else tensors["lm_head.weight"]
    for i in range(config.n_layers):
        hf_prefix = f"model.layers.{i}."
        layer = {k[len(hf_prefix):]: v for k, v in tensors.items() if k.startswith(hf_prefix)}
        state.update({f"layers.{i}.{k}": v for k, v in block.hf.layer_from_hf(layer, config, i, architecture).items()})
    return state


# --------------------------------------------------------------------------- safetensors

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)?\s*$", re.IGNORECASE)
_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(value: int | str) -> int:
    """Bytes from 5000000, "5GB" (10^9, as HF counts) or "4GiB"."""
    if isinstance(value, int):
        return value
    match = _SIZE.match(value)
    if not match:
        raise ValueError(f"bad size {value!r}: expected bytes or a number with KB/MB/GB/GiB")
    unit = (match.group(2) or "B").upper()
    return int(float(match.group(1)) * _UNITS.get(unit, 1))


def write_safetensors(
    directory: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int, metadata: dict[str, str] | None = None
) -> list[str]:
    """`model.safetensors`, or numbered shards plus the index when past `max_shard_bytes`."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        # safetensors refuses views that share storage (split projections, tied weights).
        shards[-1][name] = tensor.detach().contiguous().clone()
        size += nbytes
    meta = {"format": "pt", **(metadata or {})}
    if len(shards) == 1:
        save_file(shards[0], str(directory / WEIGHTS_FILE), metadata=meta)
        return [WEIGHTS_FILE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards, strict=True):
        save_file(shard, str(directory / name), metadata=meta)
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    atomic.write_json(directory / WEIGHTS_INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return [*names, WEIGHTS_INDEX_FILE]


def weight_files(directory: Path) -> list[Path]:
    index = directory / WEIGHTS_INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise CheckpointError(f"{index} is not a valid safetensors index") from None
        files = [directory / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{directory}: shard {missing[0]} named in {index.name} is missing")
        return files
    if (directory / WEIGHTS_FILE).is_file():
        return [directory / WEIGHTS_FILE]
    found = sorted(directory.glob("*.safetensors"))
    if found:
        return found
    if any(directory.glob("*.bin")) or any(directory.glob("*.pth")):
        raise CheckpointError(
            f"{directory} holds only pickled weights (.bin/.pth); lmforge reads safetensors only "
            "(pickles can run code): convert them with transformers' save_pretrained first"
        )
    raise CheckpointError(f"{directory} has no model weights ({WEIGHTS_FILE})")


def read_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in weight_files(directory):
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    tensors[name] = f.get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as err:
            raise CheckpointError(f"{file} is truncated or corrupt ({str(err).splitlines()[0][:160]})") from None
    return tensors
