"""`lmforge eval`: tasks, bits per byte and harness tasks on a model; results saved as JSON.

Each result is `eval/<name>.json` in the run dir (for a run or checkpoint) or the model
dir: the metrics with their standard errors, the number of examples, few-shot count,
seed, the model's weight hash and step, and lmforge/torch versions, so two numbers can be
told apart. `compare` tabulates those files across models.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import json
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from lmforge import __version__, atomic, hub
from lmforge import device as devices
from lmforge.config import Section
from lmforge.data.loader import TokenDataset
from lmforge.data.readers import expand_inputs, read_documents
from lmforge.errors import ConfigError, DataError, LmforgeError, OutputError
from lmforge.eval import perplexity, tasks
from lmforge.eval.scoring import Scorer
from lmforge.monitor.progress import Progress
from lmforge.monitor.trackers import TrackerConfig, log_eval_results
from lmforge.store import checkpoint, hashes, token_dataset
from lmforge.store.hashes import model_hash
from lmforge.store.loading import eval_dir, load_model, records_dir
from lmforge.store.model_dir import is_model_dir
from lmforge.store.run_dir import CHECKPOINTS_DIR
from lmforge.store.weights import weights_digest_or_none

log = logging.getLogger(__name__)

class EvalConfig(Section):
    model: str = Field(description="model dir, run dir, checkpoint dir or Hub id org/name[@revision]")
    tasks: list[str] = Field(default_factory=list, description="shipped task names, task YAMLs or JSONL files")
    data: list[str] = Field(default_factory=list, description="text/jsonl/parquet files or token dataset dirs: bits per byte")
    text_field: str = "text"
    split: str = Field("val", description="split of token dataset dirs")
    harness: list[str] = Field(default_factory=list, description="lm-evaluation-harness task names")
    harness_include: str | None = Field(None, description="dir of extra harness task YAMLs (local data)")
    limit: int | None = Field(None, ge=1, description="first N examples of each task")
    max_windows: int | None = Field(None, ge=1, description="token datasets: at most N windows")
    batch_size: int = Field(16, ge=1)
    device: str = Field("auto", description="auto: cuda if available, else cpu")
    dtype: devices.DtypeName = "auto"
    seed: int = 1234
    out: str | None = Field(None, description="results dir; default: eval/ of the run or model dir")
    save: bool = True
    trackers: TrackerConfig = Field(
        default_factory=TrackerConfig,
        description="results also go to the tracker runs of the run evaluated (its trackers.json); "
        "backends here add a run of their own")

    def requested(self) -> bool:
        return bool(self.tasks or self.data or self.harness)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in text)


def run(config: EvalConfig) -> dict[str, dict[str, Any]]:
    """Evaluate; return {result name: result}, written to `eval/<name>.json` unless save=False."""
    if not config.requested():
        shipped = ", ".join(tasks.shipped_tasks())
        raise ConfigError(f"nothing to evaluate: give --tasks (shipped: {shipped}), --data or --harness")
    # Resolve every task before loading the model: a bad file fails in a second.
    task_list = [task for name in config.tasks for task in tasks.resolve_tasks(name)]
    dtype = devices.stored_or(config.dtype, "eval.dtype")
    model, tokenizer, source = load_model(config.model, config.device, dtype)
    placed = next(model.parameters())
    devices.log_choice("eval.device", config.device, placed.device, placed.dtype)
    scorer = Scorer(model, tokenizer, config.batch_size)
    common = {
        "model": config.model if hub.is_hub_id(config.model) else str(Path(config.model).resolve()),
        "source": str(source),
        "model_hash": model_hash(model),
        "weights_digest": weights_digest_or_none(source),  # of the files: what `lmforge verify` rechecks
        "step": _step(source),
        "seed": config.seed,
        "limit": config.limit,
        "lmforge_version": __version__,
        "torch_version": torch.__version__,
        "device": str(placed.device),  # what `auto` chose
        "dtype": devices.dtype_name(placed.dtype),
    }
    results: dict[str, dict[str, Any]] = {}

    def record(name: str, kind: str, body: dict[str, Any], seconds: float, examples: int) -> None:
        results[name] = {
            "task": name, "kind": kind, **body, **common,
            "seconds": round(seconds, 3),
            "examples_per_second": round(examples / seconds, 3) if seconds > 0 else None,
            "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        metrics = ", ".join(f"{m} {v['value']:.4f}" for m, v in body["metrics"].items())
        log.info("%s: %s (n=%s, %.1fs)", name, metrics, body.get("n"), seconds)

    for task in task_list:
        start = time.perf_counter()
        with _scoring(scorer, f"eval {task.spec.name}", _requests(task, config.limit)):
            body = tasks.evaluate(task, scorer, config.limit, config.seed)
        body["data"] = {"path": str(task.path),  # a Hub dataset is named by its id
                        "sha256": hashes.sha256_file(task.path) if Path(task.path).is_file() else None}
        record(task.spec.name, task.spec.type, body, time.perf_counter() - start, body["n"])

    for item in config.data:
        start = time.perf_counter()
        with _scoring(scorer, f"eval {Path(item).name}", None):
            figures = _bits_per_byte(item, config, scorer)
        body = {"metrics": {k: {"value": figures[k], "stderr": None} for k in ("bits_per_byte", "byte_perplexity", "token_perplexity")},
                "n": figures["documents"], "tokens": figures["tokens"], "bytes": figures["bytes"],
                "data": {"path": str(Path(item).resolve()) if Path(item).exists() else item,  # lineage: its hash
                         "sha256": hashes.sha256_file(item) if Path(item).is_file() else None}}
        record(f"bpb-{_slug(Path(item).name.split('.')[0])}", "perplexity", body, time.perf_counter() - start, figures["documents"])

    if config.harness:
        from lmforge.eval.harness import run_harness

        start = time.perf_counter()
        out = run_harness(
            str(source), config.harness, config.harness_include, config.limit, None,
            config.batch_size, config.device, config.seed,
        )
        seconds = time.perf_counter() - start
        for name, metrics in out["results"].items():
            values = {
                key.split(",")[0]: {"value": value, "stderr": _finite(metrics.get(key.replace(",", "_stderr,", 1)))}
                for key, value in metrics.items()
                if "," in key and "_stderr" not in key and isinstance(value, (int, float))
            }
            n = out.get("n-samples", {}).get(name, {}).get("effective")
            record(f"harness-{name}", "harness", {"metrics": values, "n": n}, seconds, n or 0)

    if config.save:
        _save(Path(config.out) if config.out else eval_dir(source), results)
    _report_to_trackers(config, source, results, common["step"])
    return results


def _save(directory: Path, results: dict[str, dict[str, Any]]) -> None:
    """`directory/<name>.json` per result: earlier results of a task are replaced, never a file lmforge did not write."""
    for name in results:
        _check_replaceable(directory / f"{name}.json")
    for name, result in results.items():
        atomic.write_json(directory / f"{name}.json", result)


def _check_replaceable(path: Path) -> None:
    """Refuse to replace `path` unless it is absent or an eval result (its task, kind and metrics)."""
    if not path.exists():
        return
    try:
        earlier = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        earlier = None
    if not (isinstance(earlier, dict) and {"task", "kind", "metrics"} <= earlier.keys()):
        raise OutputError(f"refusing to replace {path}: it is not an lmforge eval result (choose another --out)")


def _report_to_trackers(config: EvalConfig, source: Path, results: dict[str, dict[str, Any]], step: int | None) -> None:
    """Send the metrics to the tracker runs of the run evaluated, under the names training logs them."""
    values = {f"eval/{name}/{metric}": value["value"] for name, result in results.items()
              for metric, value in result["metrics"].items() if isinstance(value.get("value"), (int, float))}
    try:
        directory = records_dir(source)
    except LmforgeError:  # an adapter dir or other source without a records dir: nothing recorded to follow
        return
    backends = log_eval_results(directory, f"eval-{Path(config.model).name}", values, step, config.trackers)
    if backends:
        log.info("eval results sent to %s", ", ".join(backends))


@contextlib.contextmanager
def _scoring(scorer: Scorer, desc: str, total: int | None) -> Iterator[None]:
    """A progress bar (on a terminal) over the requests `scorer` serves inside the block."""
    with Progress(desc, total, unit="req") as progress:
        scorer.progress = progress
        try:
            yield
        finally:
            scorer.progress = None


def _requests(task: tasks.Task, limit: int | None) -> int:
    """How many requests a task makes of the scorer: one per choice, or one per example."""
    examples = task.examples[:limit] if limit else task.examples
    if task.spec.type == "multiple_choice":
        return sum(len(ex.choices) for ex in examples)
    return len(examples)


def _finite(value: Any) -> float | None:
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def _step(source: Path) -> int | None:
    match = checkpoint.STEP_DIR.match(source.name)
    return int(match.group(1)) if match else None


def _bits_per_byte(item: str, config: EvalConfig, scorer: Scorer) -> dict[str, Any]:
    path = Path(item)
    if path.is_dir() and token_dataset.manifest_path(path).is_file():
        dataset = TokenDataset(path, config.split)
        if dataset.tokenizer_hash != scorer.tokenizer.hash():
            raise DataError(f"{path} was tokenized with a different tokenizer than the model's; give the raw text instead")
        return perplexity.evaluate_token_split(
            scorer.model, dataset, scorer.max_length, config.batch_size, config.max_windows
        )
    # islice: a streamed Hub dataset is read only as far as `limit`.
    texts = list(itertools.islice(read_documents(expand_inputs([item]), config.text_field), config.limit))
    if not any(texts):
        raise DataError(f"{path}: no text to evaluate")
    return perplexity.evaluate_texts(scorer, texts)


# ------------------------------------------------------------------------------ compare


def load_results(model: str) -> dict[str, dict[str, Any]]:
    """Results of a model dir, run dir or checkpoint (its eval/), or of a results dir itself."""
    path = Path(model)
    is_results_dir = path.is_dir() and not is_model_dir(path) and not (path / CHECKPOINTS_DIR).is_dir() and any(path.glob("*.json"))
    directory = path if is_results_dir else eval_dir(path)
    results = {}
    for file in sorted(directory.glob("*.json")):
        try:
            results[file.stem] = json.loads(file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise DataError(f"{file} is not valid JSON") from None
    if not results:
        raise DataError(f"no evaluation results in {directory} (run `lmforge eval {model} --tasks ...` first)")
    return results


def compare(models: list[str]) -> tuple[list[str], list[list[str]]]:
    """(header, rows): one row per task and metric, one column per model, `value ± stderr`."""
    if len(models) < 1:
        raise ConfigError("compare needs at least one model, run or eval dir")
    loaded = [load_results(m) for m in models]
    keys = sorted({(task, metric) for results in loaded for task, r in results.items() for metric in r.get("metrics", {})})
    rows = []
    for task, metric in keys:
        row = [task, metric]
        for results in loaded:
            value = results.get(task, {}).get("metrics", {}).get(metric)
            if value is None:
                row.append("-")
            else:
                stderr = value.get("stderr")
                row.append(f"{value['value']:.4f}" + (f" ± {stderr:.4f}" if isinstance(stderr, (int, float)) and math.isfinite(stderr) else ""))
        rows.append(row)
    return ["task", "metric", *models], rows
