"""`lmforge quickstart`: every stage of the spine on the bundled corpus, in minutes on a CPU.

Stages run in order; each has a fingerprint of its config and its inputs' hashes, and is
skipped when the fingerprint matches the last run and its outputs still exist. Each stage
is a function `(config, results) -> Stage` that reads what earlier stages produced from
`results`; a new stage is one more function in `stages()`.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import Field

from lmforge import atomic
from lmforge.align.config import AlignConfig
from lmforge.align.run import run_sft
from lmforge.config import Section
from lmforge.data import curate, tokenize
from lmforge.data.curate import CurateConfig
from lmforge.data.readers import expand_inputs, read_documents
from lmforge.data.tokenizer_train import TokenizerTrainConfig, run_train
from lmforge.eval.runner import EvalConfig
from lmforge.eval.runner import run as run_eval
from lmforge.interop import export
from lmforge.model.config import ModelConfig
from lmforge.safety.refusal import JUDGE_DATA
from lmforge.serve.config import EngineConfig
from lmforge.serve.engine import Engine
from lmforge.serve.sampling import SamplingConfig
from lmforge.store import checkpoint, hashes, token_dataset
from lmforge.store.loading import load_model
from lmforge.store.run_dir import RunDir
from lmforge.tokenizer import load_tokenizer
from lmforge.train import pretrain, trainer
from lmforge.train.config import TrainConfig

log = logging.getLogger(__name__)

BUNDLED_CORPUS = Path(__file__).parent / "data" / "corpus" / "python_docs.jsonl.gz"
BUNDLED_CHAT = [
    Path(__file__).parent / "data" / "chat" / "python_docs_chat.jsonl.gz",
    Path(__file__).parent / "data" / "moderation" / "safety_sft.jsonl.gz",
]
SAFETY_TASKS = Path(__file__).parent / "eval" / "tasks"
STATE_FILE = "stages.json"
KIND = "quickstart work dir"  # the output marker's kind (atomic.check_output_dir)


class QuickstartConfig(Section):
    out: str = "quickstart"
    overwrite: bool = Field(False, description="use an out dir that lmforge's quickstart did not write")
    corpus: list[str] = Field(default_factory=lambda: [str(BUNDLED_CORPUS)])
    # Curation first: the corpus plus a few planted exact and near duplicates through
    # `lmforge curate`; the tokenizer and the token dataset then read the curated shards.
    curate: bool = Field(True, description="run the curation stage (false: tokenize the corpus as is)")
    planted_duplicates: int = Field(3, ge=0, description="exact copies and as many near copies planted")
    vocab_size: int = Field(4096, ge=512)
    val_fraction: float = Field(0.05, gt=0, lt=1)
    num_workers: int = Field(2, ge=1)
    model: ModelConfig = ModelConfig(preset="small", max_seq_len=256)
    seq_len: int = Field(256, ge=8)
    max_steps: int = Field(300, ge=1)
    global_batch_tokens: int = Field(8192, ge=1)
    micro_batch_size: int = Field(16, ge=1)
    lr: float = Field(3e-3, gt=0)
    warmup_steps: int = Field(30, ge=0)
    eval_every: int = Field(100, ge=0)
    device: str = "auto"
    seed: int = 1337
    prompt: str = "The Python interpreter"
    sampling: SamplingConfig = SamplingConfig(max_tokens=60, temperature=0.8, top_k=50, seed=0)
    progress: bool = True
    # Alignment: a short SFT on the bundled chat data (Python docs Q&A + the safety set:
    # harmful requests refused, their benign neighbours answered), then the safety evals on
    # the pretrained and the fine-tuned model side by side, judged by the refusal classifier.
    sft_data: list[str] = Field(default_factory=lambda: [str(p) for p in BUNDLED_CHAT if p.is_file()])
    sft_steps: int = Field(300, ge=0, description="0 skips the SFT stage")
    sft_lr: float = Field(1e-3, gt=0)
    safety_eval_limit: int | None = Field(None, ge=1, description="prompts per safety set (default: all 40)")


@dataclasses.dataclass
class Stage:
    name: str
    fingerprint: dict[str, Any]
    outputs: list[Path]
    run: Callable[[], dict[str, Any]]  # returns details for the summary


@dataclasses.dataclass
class StageResult:
    name: str
    status: str  # "ran" | "skipped"
    seconds: float
    outputs: list[str]
    details: dict[str, Any]


class Pipeline:
    """Runs stages in order, skipping those whose fingerprint and outputs are unchanged."""
    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.state_path = workdir / STATE_FILE
        self.state: dict[str, Any] = (
            json.loads(self.state_path.read_text()) if self.state_path.is_file() else {}
        )

    def run(self, stage: Stage) -> StageResult:
        key = hashes.sha256_json(stage.fingerprint)
        previous = self.state.get(stage.name, {})
        outputs = [str(p) for p in stage.outputs]
        if previous.get("fingerprint") == key and all(p.exists() for p in stage.outputs):
            log.info("stage %s: inputs unchanged, skipped", stage.name)
            return StageResult(stage.name, "skipped", 0.0, outputs, previous.get("details", {}))
        log.info("stage %s: running", stage.name)
        start = time.perf_counter()
        details = stage.run()
        seconds = time.perf_counter() - start
        self.state[stage.name] = {"fingerprint": key, "details": details, "seconds": seconds}
        atomic.write_json(self.state_path, self.state)
        return StageResult(stage.name, "ran", seconds, outputs, details)


@dataclasses.dataclass(frozen=True)
class WorkDir:
    """Where each stage writes inside the quickstart's own work dir."""
    out: Path

    @property
    def curated(self) -> Path:
        return self.out / "curated"

    @property
    def tokenizer(self) -> Path:
        return self.out / "tokenizer"

    @property
    def tokens(self) -> Path:
        return self.out / "tokens"

    @property
    def runs(self) -> Path:
        return self.out / "runs"

    @property
    def pretrain_run(self) -> Path:
        return self.runs / "quickstart"

    @property
    def sft_run(self) -> Path:
        return self.runs / "quickstart-sft"


def training_corpus(config: QuickstartConfig) -> list[str]:
    """What the tokenizer and the token dataset read: the curated shards, or the corpus as is."""
    return [str(WorkDir(Path(config.out)).curated)] if config.curate else config.corpus


def runs_sft(config: QuickstartConfig) -> bool:
    return bool(config.sft_steps and config.sft_data)


def curate_stage(config: QuickstartConfig, results: dict[str, StageResult]) -> Stage:

    work = WorkDir(Path(config.out))
    planted = work.out / "curate_input.jsonl.gz"
    curate_config = curate_recipe(config, planted, work.curated)

    def go() -> dict:
        plant_duplicates(config.corpus, planted, config.planted_duplicates)
        report = curate.run(curate_config).report
        removed = {f"{s['step']}/{r}": v["docs"] for s in report["steps"] for r, v in s["removed"].items()}
        return {"records": report["input"]["records"], "docs": report["output"]["docs"], "removed": removed,
                "warnings": report["warnings"]}

    source = tokenize.source_fingerprint(tokenize.expand_inputs(config.corpus))["hash"]
    return Stage("curate", {"config": curate_config.model_dump(mode="json"), "source": source,
                            "planted": config.planted_duplicates}, [work.curated / "report.json"], go)


def tokenizer_stage(config: QuickstartConfig, results: dict[str, StageResult]) -> Stage:

    work, corpus = WorkDir(Path(config.out)), training_corpus(config)
    tk_config = TokenizerTrainConfig(inputs=corpus, out=str(work.tokenizer), vocab_size=config.vocab_size,
                                     overwrite=True)  # inside the quickstart's own work dir

    def go() -> dict:
        tokenizer = run_train(tk_config)
        return {"vocab_size": tokenizer.vocab_size, "hash": tokenizer.hash()}

    source = tokenize.source_fingerprint(tokenize.expand_inputs(corpus))["hash"]
    return Stage("tokenizer", {"config": tk_config.model_dump(), "source": source},
                 [work.tokenizer / "tokenizer.json"], go)


def tokenize_stage(config: QuickstartConfig, results: dict[str, StageResult]) -> Stage:

    work = WorkDir(Path(config.out))
    tok_config = tokenize.TokenizeConfig(
        inputs=training_corpus(config), tokenizer=str(work.tokenizer), out=str(work.tokens),
        val_fraction=config.val_fraction, num_workers=config.num_workers, seed=config.seed,
        overwrite=True,  # inside the quickstart's own work dir
    )

    def go() -> dict:
        manifest = tokenize.run(tok_config)
        return {s: {k: v[k] for k in ("tokens", "documents")} for s, v in manifest["splits"].items()}

    fingerprint = {"config": tok_config.model_dump(), "tokenizer": load_tokenizer(work.tokenizer).hash(),
                   "source": results["tokenizer"].details.get("hash")}
    return Stage("tokenize", fingerprint, [work.tokens / token_dataset.MANIFEST], go)


def train_stage(config: QuickstartConfig, results: dict[str, StageResult]) -> Stage:

    work = WorkDir(Path(config.out))
    train_config = TrainConfig.model_validate({
        "run": {"name": "quickstart", "out_dir": str(work.runs), "seed": config.seed},
        "model": config.model.model_dump(exclude_unset=False),
        "data": {"dataset": str(work.tokens), "seq_len": config.seq_len},
        "optim": {"lr": config.lr},
        "schedule": {"warmup_steps": config.warmup_steps},
        "train": {
            "max_steps": config.max_steps, "global_batch_tokens": config.global_batch_tokens,
            "micro_batch_size": config.micro_batch_size, "eval_every": config.eval_every,
            "checkpoint_every": 0, "device": config.device, "progress": config.progress,
            "log_every": 10,
        },
    })

    def go() -> dict:
        # Same fingerprint as a finished run means skip; a changed one starts over.
        if work.pretrain_run.exists():
            shutil.rmtree(work.pretrain_run)
        result = trainer.run(train_config)
        return {
            "steps": result.step, "first_loss": result.losses[0], "final_loss": result.losses[-1],
            "val_loss": result.val_loss, "val_bpb": result.val_bpb,
            "params": pretrain.resolve_vocab(
                train_config.model_copy(deep=True), load_tokenizer(work.tokenizer).vocab_size
            ).model.num_params(),
        }

    fingerprint = {"config": train_config.model_dump(), "dataset": token_dataset.manifest_hash(work.tokens)}
    return Stage("train", fingerprint, [RunDir(work.pretrain_run).checkpoints / checkpoint.LATEST], go)


def sample_stage(config: QuickstartConfig, results: dict[str, StageResult]) -> Stage:

    work = WorkDir(Path(config.out))

    def go() -> dict:
        model, tokenizer, _ = load_model(work.pretrain_run)
        with Engine(model, tokenizer, EngineConfig(max_num_seqs=1)) as engine:
            text = engine.generate([config.prompt], config.sampling.params())[0].text
        atomic.write_text(work.out / "sample.txt", config.prompt + text + "\n")
        return {"prompt": config.prompt, "completion": text}

    fingerprint = {"prompt": config.prompt, "sampling": config.sampling.model_dump(),
                   "train": results["train"].details}
    return Stage("sample", fingerprint, [work.out / "sample.txt"], go)


def sft_stage(config: QuickstartConfig, results: dict[str, StageResult]) -> Stage:

    work = WorkDir(Path(config.out))
    data_path = work.out / "sft_data.jsonl"
    align_config = AlignConfig.model_validate({
        "model": str(work.pretrain_run),
        "run": {"name": "quickstart-sft", "out_dir": str(work.runs), "seed": config.seed},
        "data": {"train": str(data_path), "seq_len": config.seq_len, "val_fraction": 0.05},
        "optim": {"lr": config.sft_lr},
        "schedule": {"warmup_steps": min(10, config.sft_steps)},
        "train": {"max_steps": max(1, config.sft_steps), "global_batch_tokens": config.global_batch_tokens,
                  "micro_batch_size": config.micro_batch_size, "eval_every": 0, "checkpoint_every": 0,
                  "device": config.device, "progress": config.progress, "log_every": 10},
    })

    def go() -> dict:
        lines = []
        for file in config.sft_data:
            opener = gzip.open if file.endswith(".gz") else open
            with opener(file, "rt", encoding="utf-8") as f:
                lines += [line if line.endswith("\n") else line + "\n" for line in f if line.strip()]
        atomic.write_text(data_path, "".join(lines))
        if work.sft_run.exists():
            shutil.rmtree(work.sft_run)
        result = run_sft(align_config)
        return {"steps": result.step, "conversations": len(lines), "first_loss": result.losses[0],
                "final_loss": result.losses[-1], "val_loss": result.val_loss}

    # The data's content, not only its paths: an edited file reruns the stage.
    data = {file: hashes.sha256_file(file) for file in config.sft_data}
    fingerprint = {"config": align_config.model_dump(), "data": data, "train": results["train"].details}
    return Stage("sft", fingerprint, [RunDir(work.sft_run).checkpoints / checkpoint.LATEST], go)


def safety_stage(config: QuickstartConfig, results: dict[str, StageResult]) -> Stage:

    work = WorkDir(Path(config.out))
    models = {"pretrained": work.pretrain_run}
    if runs_sft(config):
        models["sft"] = work.sft_run

    def go() -> dict:
        details = {}
        for name, path in models.items():
            found = run_eval(EvalConfig(model=str(path), tasks=["safety"], limit=config.safety_eval_limit, seed=config.seed))
            details[name] = {f"{task}/{m}": {"value": v["value"], "stderr": v["stderr"], "n": r["n"]}
                             for task, r in found.items() for m, v in r["metrics"].items()}
        return details

    # What decides the rates: the eval sets and the refusal judge's data, by content.
    judged_by = [*sorted(SAFETY_TASKS.glob("safety*")), JUDGE_DATA]
    fingerprint = {"limit": config.safety_eval_limit, "models": {k: str(v) for k, v in models.items()},
                   "train": results["train"].details, "sft": results["sft"].details if "sft" in results else None,
                   "judged_by": {p.name: hashes.sha256_file(p) for p in judged_by if p.is_file()}}
    return Stage("safety", fingerprint, [RunDir(path).eval_dir / "safety_harmful.json" for path in models.values()], go)


def export_stage(config: QuickstartConfig, results: dict[str, StageResult]) -> Stage:

    work = WorkDir(Path(config.out))
    model_dir = work.out / "model"
    source = work.sft_run if runs_sft(config) else work.pretrain_run
    export_config = export.ExportConfig(model=str(source), out=str(model_dir), name="lmforge-quickstart", overwrite=True)

    def go() -> dict:
        result = export.run(export_config)
        return {"model_dir": str(result.out), "files": result.files}

    fingerprint = {"config": export_config.model_dump(), "train": results["train"].details,
                   "sft": results["sft"].details if "sft" in results else None}
    return Stage("export", fingerprint, [model_dir / "config.json"], go)


StageFactory = Callable[[QuickstartConfig, dict[str, StageResult]], Stage]


def stages(config: QuickstartConfig) -> list[StageFactory]:
    """The spine in order; each factory reads what earlier stages produced via `results`."""
    spine: list[StageFactory] = [tokenizer_stage, tokenize_stage, train_stage, sample_stage]
    if config.curate:
        spine.insert(0, curate_stage)
    if runs_sft(config):
        spine.append(sft_stage)
    return [*spine, safety_stage, export_stage]


def plant_duplicates(corpus: list[str], path: Path, count: int) -> None:
    """The corpus plus `count` exact copies and `count` copies with one word changed (for dedup to find)."""
    texts = list(read_documents(expand_inputs(corpus)))
    lines = [{"id": f"doc-{i:05d}", "text": t} for i, t in enumerate(texts)]
    for i in range(min(count, len(texts) // 2)):
        lines.append({"id": f"planted-exact-{i}", "text": texts[i]})
        words = texts[-1 - i].split(" ")
        middle = len(words) // 2
        words[middle] = "banana" if words[middle] != "banana" else "cherry"
        lines.append({"id": f"planted-near-{i}", "text": " ".join(words)})
    atomic.write_bytes(path, gzip.compress("".join(json.dumps(r) + "\n" for r in lines).encode("utf-8"), mtime=0))


def curate_recipe(config: QuickstartConfig, source: Path, out: Path):
    """The default recipe for the bundled docs, minus the web-page heuristics.

    Gopher quality, C4 and FineWeb are tuned for web pages: on the Python docs (prose with
    code) they remove 40-70% of the documents (alpha-word ratio, curly brackets, duplicated
    characters), so the quickstart leaves them off; `lmforge curate` runs them by default.
    """

    off = {"enabled": False}
    return CurateConfig.model_validate({
        "input": {"paths": [str(source)]},
        "output": {"dir": str(out), "overwrite": True},  # inside the quickstart's own work dir
        "gopher_repetition": off, "gopher_quality": off, "c4": off, "fineweb": off,
        "executor": {"workers": config.num_workers},
    })


def run(config: QuickstartConfig) -> list[StageResult]:
    out = Path(config.out)
    # The work dir holds its own run dirs, so those do not make it someone else's.
    atomic.check_output_dir(out, KIND, overwrite=config.overwrite, inputs=[*config.corpus, *config.sft_data],
                            signature=STATE_FILE, allow_run_dir=True)
    out.mkdir(parents=True, exist_ok=True)
    atomic.mark_output_dir(out, KIND)
    pipeline = Pipeline(out)
    results: dict[str, StageResult] = {}
    for factory in stages(config):
        stage = factory(config, results)
        results[stage.name] = pipeline.run(stage)
    summary = {name: dataclasses.asdict(r) for name, r in results.items()}
    atomic.write_json(out / "summary.json", summary)
    return list(results.values())
