"""LoRA adapters in the layout Hugging Face peft and vLLM read for the exported model.

lmforge trains adapters on its fused projections; the model `lmforge export` writes has
separate ones, so an adapter dir names those instead, with peft's tensor names for
`LlamaForCausalLM` (`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`):

    attn.wqkv -> self_attn.q_proj | k_proj | v_proj     ffn.w13 -> mlp.gate_proj | up_proj
    attn.wo   -> self_attn.o_proj                       ffn.w2  -> mlp.down_proj
    output    -> lm_head

A fused update B·A splits exactly: each projection keeps A and takes its rows of B, the same
rows `llama_hf.attention_to_hf` / `mlp_to_hf` give its weight (RoPE is rotate-half, as HF's,
so no row permutation). Reading concatenates the rows of B back and requires the A's of one
fused module to be equal: an adapter trained on separate projections has no fused form.
Modules outside this mapping (a mixture-of-experts layer's shared experts) keep lmforge's
own names; such an adapter loads in lmforge only.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from lmforge.errors import CheckpointError

PEFT_PREFIX = "base_model.model."
# lmforge module (relative to layers.{i}) -> its HF modules, in the order of the fused rows.
LAYER_MODULES = {
    "attn.wqkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "attn.wo": ("self_attn.o_proj",),
    "ffn.w13": ("mlp.gate_proj", "mlp.up_proj"),
    "ffn.w2": ("mlp.down_proj",),
}
HF_TARGETS = {"wqkv": ("q_proj", "k_proj", "v_proj"), "wo": ("o_proj",), "w13": ("gate_proj", "up_proj"),
              "w2": ("down_proj",), "output": ("lm_head",)}
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")

Pairs = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module name -> (lora_A [r, in], lora_B [out, r])


def split_rows(module: str, config, rows: int) -> list[int] | None:
    """How the fused module's `rows` output rows split among its HF modules (None: not split)."""
    if module == "attn.wqkv":
        return [config.n_heads * config.head_dim] + [config.n_kv_heads * config.head_dim] * 2
    if module == "ffn.w13":
        return [rows // 2, rows // 2]
    return None


def convertible(pairs: Pairs) -> bool:
    """Whether every adapted module has an HF name (else the adapter keeps lmforge's names)."""
    for name in pairs:
        match = _LAYER.match(name)
        if name != "output" and not (match and match.group(2) in LAYER_MODULES):
            return False
    return True


def to_hf(pairs: Pairs, config) -> dict[str, torch.Tensor]:
    """lmforge's (A, B) per module -> peft's tensors for the exported LlamaForCausalLM."""
    out = {}
    for name, (a, b) in pairs.items():
        if name == "output":
            targets, blocks = ["lm_head"], [b]
        else:
            layer, module = _LAYER.match(name).groups()
            rows = split_rows(module, config, b.shape[0])
            blocks = list(b.split(rows)) if rows else [b]
            targets = [f"model.layers.{layer}.{hf}" for hf in LAYER_MODULES[module]]
        for target, block in zip(targets, blocks, strict=True):
            out[f"{PEFT_PREFIX}{target}.lora_A.weight"] = a.contiguous()
            out[f"{PEFT_PREFIX}{target}.lora_B.weight"] = block.contiguous()
    return out


def _pairs_by_name(tensors: dict[str, torch.Tensor], source: Path) -> Pairs:
    """peft's flat tensor names -> {module name without peft's prefix: (A, B)}."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = re.match(rf"^{re.escape(PEFT_PREFIX)}(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$", key)
        if not match:
            raise CheckpointError(f"{source}: tensor {key!r} is not a LoRA weight this reader knows")
        found.setdefault(match.group(1), {})[match.group(2)] = tensor
    incomplete = [name for name, ab in found.items() if set(ab) != {"A", "B"}]
    if incomplete:
        raise CheckpointError(f"{source}: module {incomplete[0]!r} lacks its lora_A or lora_B weight")
    return {name: (ab["A"], ab["B"]) for name, ab in found.items()}


def from_hf(tensors: dict[str, torch.Tensor], config, source: Path) -> Pairs:
    """peft's tensors (either layout: HF module names, or lmforge's own) -> lmforge's (A, B) per module."""
    named = _pairs_by_name(tensors, source)
    pairs: Pairs = {}
    grouped: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    for name, ab in named.items():
        if name == "lm_head":
            pairs["output"] = ab
            continue
        match = _HF_LAYER.match(name)
        if match is None:  # lmforge's names (older adapters, or modules HF has no name for)
            pairs[name] = ab
            continue
        layer, hf = match.groups()
        module = next((m for m, parts in LAYER_MODULES.items() if hf in parts), None)
        if module is None:
            raise CheckpointError(f"{source}: LoRA on {name!r} has no lmforge module (adaptable: "
                                  "q/k/v/o_proj, gate/up/down_proj, lm_head)")
        grouped.setdefault(f"layers.{layer}.{module}", {})[hf] = ab
    for name, parts in grouped.items():
        module = _LAYER.match(name).group(2)
        missing = [hf for hf in LAYER_MODULES[module] if hf not in parts]
        if missing:
            raise CheckpointError(f"{source}: {name} is fused in lmforge, so its LoRA needs all of "
                                  f"{', '.join(LAYER_MODULES[module])}; {missing[0]} is missing")
        a = parts[LAYER_MODULES[module][0]][0]
        if any(not torch.equal(parts[hf][0], a) for hf in LAYER_MODULES[module]):
            raise CheckpointError(f"{source}: the lora_A of {', '.join(LAYER_MODULES[module])} in layer "
                                  f"{_LAYER.match(name).group(1)} differ, so they have no fused form in lmforge "
                                  "(train the adapter with lmforge, or merge it with peft)")
        pairs[name] = (a, torch.cat([parts[hf][1] for hf in LAYER_MODULES[module]]))
    return pairs


def targets_from_hf(target_modules, source: Path) -> list[str]:
    """adapter_config.json's target_modules -> lmforge's LoRA targets (lmforge's own names pass)."""
    if isinstance(target_modules, str):
        raise CheckpointError(f"{source}: target_modules as a regular expression is not supported; list the modules")
    hf_to_ours = {hf: ours for ours, parts in HF_TARGETS.items() for hf in parts}
    targets = []
    for name in target_modules or []:
        ours = hf_to_ours.get(name, name)
        if ours not in HF_TARGETS:
            raise CheckpointError(f"{source}: LoRA target {name!r} has no lmforge module "
                                  f"(allowed: {', '.join(hf_to_ours)}, or lmforge's {', '.join(HF_TARGETS)})")
        if ours not in targets:
            targets.append(ours)
    return targets
