"""model_card.md: what a model is, where it came from, how it scored, and how to load it.

Lineage (data manifest hash, tokenizer hash, git commit, parent) is written twice: as YAML
front matter that tools parse, and as prose that people read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from lmforge.model import ModelConfig
from lmforge.store.run_dir import RunDir


def _front_matter(lineage: dict[str, Any]) -> str:
    meta = {
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["lmforge", "llama"],
        "lmforge": {k: v for k, v in lineage.items() if v is not None},
    }
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


def architecture(config: ModelConfig) -> str:
    """The decoder in words: its block type and the options it uses."""
    parts = [f"{config.block} block decoder (RoPE, RMSNorm, SwiGLU, GQA)"]
    if config.qk_norm:
        parts.append("QK-norm")
    if config.sliding_window is not None:
        pattern = "/".join(config.attention_pattern or ["sliding"])
        parts.append(f"sliding window {config.sliding_window} ({pattern})")
    if config.moe is not None:
        moe = config.moe
        shared = f" + {moe.num_shared_experts} shared" if moe.num_shared_experts else ""
        parts.append(f"mixture of experts: {moe.num_experts} experts of {config.expert_ffn_dim}, top-{moe.top_k} "
                     f"{moe.gate}{shared}")
    return "; ".join(parts)


def _table(rows: list[tuple[str, Any]]) -> str:
    lines = ["| | |", "| --- | --- |"]
    lines += [f"| {key} | {value} |" for key, value in rows]
    return "\n".join(lines)


def _eval_section(evals: dict[str, Any]) -> str:
    if not evals:
        return "No evaluation results were recorded for this model.\n"
    lines = []
    for name, result in evals.items():
        if isinstance(result, dict) and all(isinstance(v, (int, float, str)) for v in result.values()):
            lines.append(f"**{name}**\n\n" + _table([(k, _fmt(v)) for k, v in result.items()]) + "\n")
        else:
            lines.append(f"**{name}**\n\n```json\n{json.dumps(result, indent=2)[:4000]}\n```\n")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def render(
    name: str,
    config: ModelConfig,
    dtype: str,
    weight_files: dict[str, str],
    lineage: dict[str, Any],
    evals: dict[str, Any],
    training_config: str | None = None,
    chain: list[str] | None = None,
) -> str:
    """The card's markdown. `weight_files` maps file name to sha256."""
    shape = _table([
        ("architecture", architecture(config)),
        ("parameters", f"{config.num_params():,}" + (f" ({config.num_params(active=True):,} active per token)" if config.moe else "")),
        ("layers / dim / heads / kv heads", f"{config.n_layers} / {config.dim} / {config.n_heads} / {config.n_kv_heads}"),
        ("ffn dim", config.ffn_dim),
        ("vocabulary", config.vocab_size),
        ("context", config.max_seq_len),
        ("rope theta", config.rope_theta),
        ("tied embeddings", config.tie_embeddings),
        ("dtype", dtype),
    ])
    origin = _table([(k.replace("_", " "), v) for k, v in lineage.items() if v is not None])
    files = "\n".join(f"- `{file}` sha256 `{digest}`" for file, digest in weight_files.items())
    chained = ("\nChain back to the raw files, as recorded (`lmforge verify` rechecks every hash):\n\n```\n"
               + "\n".join(chain) + "\n```\n") if chain else ""
    training = f"```yaml\n{training_config.rstrip()}\n```\n" if training_config else "Not recorded.\n"
    return f"""{_front_matter(lineage)}
# {name}

A decoder-only language model in the Hugging Face Llama layout, written by lmforge
(`lmforge export` or `lmforge import`). It loads in transformers, vLLM and
lm-evaluation-harness's `hf` backend with no custom code.

## Model

{shape}

## Lineage

{origin}

Weights:

{files}
{chained}
## Evaluation

{_eval_section(evals)}
## Training config

{training}
## Usage

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{name}")
model = AutoModelForCausalLM.from_pretrained("{name}")
ids = tokenizer("The Python standard library", return_tensors="pt")  # BOS is prepended
out = model.generate(**ids, max_new_tokens=40, do_sample=False)
print(tokenizer.decode(out[0], skip_special_tokens=True))
```

Chat: `tokenizer.apply_chat_template(messages, add_generation_prompt=True)` renders the
lmforge chat format (`<|user|>...<|end|><|assistant|>`). With lmforge:
`lmforge generate {name} --prompt "..."`.
"""


def collect_evals(run_dir: Path | None, step: int | None) -> dict[str, Any]:
    """Validation loss from metrics.jsonl (at or before `step`) and every `eval/*.json`."""
    if run_dir is None:
        return {}
    evals: dict[str, Any] = {}
    metrics = RunDir(run_dir).metrics_path
    if metrics.is_file():
        last = None
        for line in metrics.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "val_loss" in record and (step is None or record.get("step", 0) <= step):
                last = record
        if last is not None:
            evals["validation"] = {k: last[k] for k in ("step", "val_loss", "val_bpb") if k in last}
    for file in sorted(RunDir(run_dir).eval_dir.glob("*.json")):
        try:
            evals[file.stem] = json.loads(file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
    return evals
