"""`lmforge curate`: the curation recipe as datatrove stages, run by datatrove's executors.

    1 filter              read -> normalize -> language -> Gopher repetition -> Gopher quality
                          -> C4 -> FineWeb -> PII -> toxicity -> decontaminate -> work/filtered
    2 exact_signatures    a hash of each document's whitespace-normalised text
    3 exact_find          duplicates across all tasks (one task)
    4 minhash_signatures  MinHash of the exact-deduplicated stream
    5 minhash_buckets     LSH buckets -> candidate pairs (one task per bucket)
    6 minhash_cluster     pairs -> clusters, all but one member removed (one task)
    7 dedup               exact + near duplicates dropped -> work/output shards

Every stage is a datatrove executor run with its own logging dir under the work dir, so a
rerun skips the tasks that wrote their completion marker. The output dir is assembled
from finished shards and the report in a temp dir and renamed into place at the end: it
is either the previous complete output or the new one, never half of either.

A run that removes every document never publishes over a previous output: that output
stays as it was, the empty run's report goes to the work dir (kept), and the run fails
with one line naming the top reasons. Into a fresh output dir it publishes the report
alone (no shards), so the funnel shows why, and still fails.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmforge import atomic, extras
from lmforge.config import to_yaml
from lmforge.data.curate.audit import Audited, Ledger, read_ledgers
from lmforge.data.curate.config import CurateConfig
from lmforge.data.curate.reader import CurationReader, expand_inputs
from lmforge.errors import DataError
from lmforge.monitor.progress import Progress, silence_tqdm_in
from lmforge.store import hashes, lineage

log = logging.getLogger(__name__)

FINGERPRINT = "fingerprint.json"
OUTPUT_KIND, WORK_KIND = lineage.CURATED, "curation work dir"  # output markers' kinds


@dataclasses.dataclass
class Stage:
    name: str
    pipeline: list
    tasks: int


@dataclasses.dataclass
class CurateResult:
    out: Path
    report: dict[str, Any]
    shards: list[str]


def _dedup_key(doc) -> str:
    """Exact duplicates: the same text up to whitespace."""
    return " ".join(doc.text.split())


def _intermediate_record(self, doc) -> dict:
    return {"id": doc.id, "text": doc.text, "metadata": doc.metadata}


def _parquet_record(self, doc) -> dict:
    # One JSON column: metadata keys differ between documents, a parquet schema cannot.
    return {"id": doc.id, "text": doc.text, "metadata": json.dumps(doc.metadata, sort_keys=True)}


def _hash_config():
    # sha1, not datatrove's default xxhash: xxhash>=4 rejects str input, which datatrove passes.
    from datatrove.utils.hashing import HashConfig

    return HashConfig(precision=64, hash_fc="sha1")


def filter_steps(config: CurateConfig, ledger: Callable[[str], Ledger]) -> list:
    """The per-document steps of stage 1, each inside `Audited`, in recipe order."""
    from datatrove.pipeline.filters import (
        C4QualityFilter,
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
    )

    from lmforge.data.curate import steps

    lang = config.quality_language
    enabled = lambda section: getattr(config, section).enabled  # noqa: E731
    options = lambda section: getattr(config, section).model_dump(exclude={"enabled"})  # noqa: E731
    chain: list[tuple[str, Any, str]] = []
    if enabled("normalize"):
        chain.append(("normalize", steps.UnicodeNormalizer(config.normalize.form), "normalize"))
    if enabled("language"):
        chain.append(("language", steps.LanguageFilter(**options("language")), "wrong_language"))
    if enabled("gopher_repetition"):
        chain.append(("gopher_repetition", GopherRepetitionFilter(**options("gopher_repetition"), language=lang), "gopher_repetition"))
    if enabled("gopher_quality"):
        chain.append(("gopher_quality", GopherQualityFilter(**options("gopher_quality"), language=lang), "gopher_quality"))
    if enabled("c4"):
        chain.append(("c4", C4QualityFilter(**options("c4"), language=lang), "c4"))
    if enabled("fineweb"):
        chain.append(("fineweb", FineWebQualityFilter(**options("fineweb"), language=lang), "fineweb"))
    if enabled("pii"):
        chain.append(("pii", steps.PIIScrubber(**options("pii")), "pii"))
    if enabled("toxicity"):
        chain.append(("toxicity", steps.ToxicityFilter(**options("toxicity")), "toxic"))
    if enabled("decontaminate"):
        passages = steps.eval_passages(config.decontaminate.tasks)
        chain.append(("decontaminate", steps.Decontaminator(passages, config.decontaminate.ngram,
                                                            config.decontaminate.min_words), "eval_overlap"))
    return [Audited(step, ledger(name), reason) for name, step, reason in chain]


def build_stages(config: CurateConfig, files: list[str], work: Path) -> tuple[list[Stage], list[str]]:
    """The datatrove pipelines of a run and the audited step names in funnel order."""
    from datatrove.pipeline.dedup import (
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.dedup.exact_dedup import (
        ExactDedupConfig,
        ExactDedupFilter,
        ExactDedupSignature,
        ExactFindDedups,
    )
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter, ParquetWriter

    from lmforge.data.curate.steps import PIIScrubber

    scrub = PIIScrubber(**config.pii.model_dump(exclude={"enabled"})).scrub if config.pii.enabled else None

    def ledger(step: str) -> Ledger:
        return Ledger(work / "ledger", step, config.report.examples_per_reason, config.report.example_chars, scrub)

    tasks = config.tasks
    exact, near = config.exact_dedup.enabled, config.minhash.enabled
    if config.output.format == "parquet":
        final_writer = ParquetWriter(str(work / "output"), output_filename="${rank}.parquet", adapter=_parquet_record)
    else:
        final_writer = JsonlWriter(str(work / "output"), output_filename="${rank}.jsonl.gz", adapter=_intermediate_record)
    reader = CurationReader(files, ledger("read"), config.input.text_field, config.input.id_field, config.input.text_split)
    audited = filter_steps(config, ledger)
    order = ["read", *(step.name for step in audited)]
    if not (exact or near):
        return [Stage("filter", [reader, *audited, final_writer], tasks)], order

    filtered = str(work / "filtered")
    stages = [Stage("filter", [reader, *audited, JsonlWriter(filtered, output_filename="${rank}.jsonl.gz",
                                                            adapter=_intermediate_record)], tasks)]

    def read_filtered():
        return JsonlReader(filtered, glob_pattern="*.jsonl.gz", add_file_path=False)

    exact_config = ExactDedupConfig(content_getter=_dedup_key, hash_config=_hash_config())
    minhash_config = MinhashConfig(
        n_grams=config.minhash.ngram, num_buckets=config.minhash.num_buckets,
        hashes_per_bucket=config.minhash.hashes_per_bucket, seed=config.minhash.seed, hash_config=_hash_config(),
    )
    lang = config.quality_language
    if exact:
        stages += [
            Stage("exact_signatures", [read_filtered(), ExactDedupSignature(str(work / "exact" / "sigs"), exact_config)], tasks),
            Stage("exact_find", [ExactFindDedups(str(work / "exact" / "sigs"), str(work / "exact" / "dups"), exact_config)], 1),
        ]
    if near:
        # MinHash indexes the stream the final stage will filter: after exact dedup, document order kept.
        before = [ExactDedupFilter(str(work / "exact" / "dups"), exact_config)] if exact else []
        stages += [
            Stage("minhash_signatures", [read_filtered(), *before, MinhashDedupSignature(
                str(work / "minhash" / "sigs"), minhash_config, language=lang)], tasks),
            Stage("minhash_buckets", [MinhashDedupBuckets(str(work / "minhash" / "sigs"), str(work / "minhash" / "buckets"),
                                                          config=minhash_config)], config.minhash.num_buckets),
            Stage("minhash_cluster", [MinhashDedupCluster(str(work / "minhash" / "buckets"), str(work / "minhash" / "remove"),
                                                          config=minhash_config)], 1),
        ]
    dedup = []
    if exact:
        dedup.append(Audited(ExactDedupFilter(str(work / "exact" / "dups"), exact_config), ledger("exact_dedup"), "exact_duplicate"))
    if near:
        dedup.append(Audited(MinhashDedupFilter(str(work / "minhash" / "remove")), ledger("minhash_dedup"), "near_duplicate"))
    stages.append(Stage("dedup", [read_filtered(), *dedup, final_writer], tasks))
    return stages, [*order, *(step.name for step in dedup)]


def _executor(config: CurateConfig, stage: Stage, logging_dir: Path):
    if config.executor.kind == "ray":
        from datatrove.executor.ray import RayPipelineExecutor

        return RayPipelineExecutor(
            stage.pipeline, tasks=stage.tasks, workers=min(config.executor.workers, stage.tasks),
            logging_dir=str(logging_dir), cpus_per_task=config.executor.cpus_per_task, mem_per_cpu_gb=1,
        )
    from datatrove.executor import LocalPipelineExecutor

    class QuietLocalExecutor(LocalPipelineExecutor):
        """datatrove prints each task's log to the console when local_rank is 0: only errors, unless debugging."""

        def _run_for_rank(self, rank: int, local_rank: int = 0, node_rank: int = -1):
            verbose = logging.getLogger("lmforge").getEffectiveLevel() <= logging.DEBUG
            try:
                return super()._run_for_rank(rank, local_rank if verbose else local_rank + 1, node_rank)
            finally:
                _quiet_datatrove()

    return QuietLocalExecutor(stage.pipeline, tasks=stage.tasks, workers=min(config.executor.workers, stage.tasks),
                              logging_dir=str(logging_dir), start_method=config.executor.start_method)


def _quiet_datatrove() -> None:
    """Route datatrove's (loguru) console output through warnings only; task logs keep everything."""
    from loguru import logger

    if logging.getLogger("lmforge").getEffectiveLevel() > logging.DEBUG:
        logger.remove()
        logger.add(sys.stderr, level="WARNING")


def fingerprint(config: CurateConfig, files: list[str]) -> str:
    """What the work dir's intermediate files depend on; a change starts the work dir over."""
    import fsspec

    recipe = config.model_dump(mode="json", exclude={"output": {"dir", "keep_work", "work_dir"}, "report": True,
                                                     "executor": {"workers", "kind", "ray_address", "cpus_per_task", "start_method"}})
    sizes = []
    for path in files:
        fs, root = fsspec.core.url_to_fs(path)
        info = fs.info(root)
        sizes.append([path, info.get("size"), info.get("mtime") or info.get("LastModified") and str(info["LastModified"])])
    return hashes.sha256_json({"recipe": recipe, "files": sizes, "tasks": config.tasks})


def _prepare_work(work: Path, key: str) -> None:
    marker = work / FINGERPRINT
    if work.exists() and any(work.iterdir()):  # check_output_dir made sure lmforge wrote it
        previous = json.loads(marker.read_text()).get("fingerprint") if marker.is_file() else None
        if previous == key:
            log.info("curate: resuming from %s (completed tasks are skipped)", work)
            return
        log.warning("curate: %s holds a run with another recipe or input; starting over", work)
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    atomic.mark_output_dir(work, WORK_KIND)
    atomic.write_json(marker, {"fingerprint": key})


def _check_output_dirs(config: CurateConfig, out: Path, work: Path) -> None:
    """Neither the output nor the work dir may replace what lmforge's curate did not write."""
    inputs = list(config.input.paths)
    atomic.check_output_dir(out, OUTPUT_KIND, overwrite=config.output.overwrite, inputs=inputs,
                            read_inputs_recursively=True)
    if work.resolve() == out.resolve():
        raise DataError(f"output.work_dir {work} must differ from output.dir")
    atomic.check_output_dir(work, WORK_KIND, overwrite=config.output.overwrite, inputs=inputs, signature=FINGERPRINT,
                            read_inputs_recursively=True)


def run(config: CurateConfig) -> CurateResult:
    """Curate `config.input.paths` into `config.output.dir`; returns the report."""
    from lmforge.data.curate import report as reporting

    out = Path(config.output.dir)
    work = Path(config.output.work_dir) if config.output.work_dir else out.with_name(out.name + ".work")
    _check_output_dirs(config, out, work)
    files = expand_inputs(config.input.paths)
    if config.executor.kind == "ray":
        _init_ray(config)
    _prepare_work(work, fingerprint(config, files))
    stages, order = build_stages(config, files, work)
    _quiet_datatrove()
    seconds: dict[str, float] = {}
    quiet_bars = logging.getLogger("lmforge").getEffectiveLevel() > logging.DEBUG and "TQDM_DISABLE" not in os.environ
    if quiet_bars:  # datatrove's dedup stages draw tqdm bars for sub-second steps; workers inherit this
        os.environ["TQDM_DISABLE"] = "1"
    try:
        # One bar over the stages (on a terminal). datatrove's own bars stay hidden unless the log
        # level is DEBUG: in workers through the env, here (tqdm read its env at import) patched.
        with Progress("curate", total=len(stages), unit="stage", log_end=False) as progress, \
                (silence_tqdm_in("datatrove") if quiet_bars else contextlib.nullcontext()):
            _run_stages(config, stages, work, seconds, progress)
    finally:
        from datatrove.utils.logging import setup_default_logger

        setup_default_logger()
        if quiet_bars:
            os.environ.pop("TQDM_DISABLE", None)
    report = reporting.build(config, files, work, order, seconds)
    if report["output"]["docs"] == 0:
        _nothing_left(out, work, config, report)
    shards = _publish(out, work, config, report)
    if not config.output.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    return CurateResult(out, report, shards)


def _run_stages(config: CurateConfig, stages: list[Stage], work: Path, seconds: dict[str, float], progress: Progress) -> None:
    for i, stage in enumerate(stages, 1):
        progress.write(f"stage {i}/{len(stages)} {stage.name} ({stage.tasks} task{'s' if stage.tasks > 1 else ''})")
        start = time.perf_counter()
        _executor(config, stage, work / "logs" / stage.name).run()
        seconds[stage.name] = round(time.perf_counter() - start, 3)
        progress.update(1, stage=stage.name)
        if stage.name == "filter":
            _check_something_read(work)
            if len(stages) > 1 and not any((work / "filtered").glob("*.jsonl.gz")):
                # datatrove's dedup readers fail on an empty folder; there is nothing to dedup.
                log.warning("curate: the filters removed every document; deduplication skipped")
                return


def _nothing_left(out: Path, work: Path, config: CurateConfig, report: dict) -> None:
    """Every document was removed: a DataError, and a previous output is never replaced by nothing."""
    from lmforge.data.curate import report as reporting

    reasons = reporting.top_reasons(report)
    if out.exists() and any(out.iterdir()):
        reporting.write(work / "report", report)
        raise DataError(f"every document was removed ({reasons}): nothing published, the previous output in {out} "
                        f"is left as it was; this run's report: {work / 'report' / 'report.md'}")
    _publish(out, work, config, report)
    if not config.output.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    raise DataError(f"every document was removed ({reasons}); see {out / 'report.md'}")


def _check_something_read(work: Path) -> None:
    read = read_ledgers(work / "ledger", "read")
    if read["docs_out"] == 0:
        reasons = ", ".join(f"{r} {v['docs']}" for r, v in sorted(read["removed"].items(), key=lambda kv: -kv[1]["docs"]))
        hint = read["examples"].get("missing_text_field", [""])[0]
        hint = f" (records have {hint.rsplit('keys: ', 1)[-1]}; set input.text_field)" if "keys: " in hint else ""
        raise DataError(f"no usable documents in the input: {read['docs_in']} records, {reasons or 'none'}{hint}")


def _publish(out: Path, work: Path, config: CurateConfig, report: dict) -> list[str]:
    """Hard-link (or copy) the finished shards beside the report into a temp dir, then rename it over `out`."""
    from lmforge.data.curate import report as reporting

    shards = sorted(p for p in (work / "output").rglob("*") if p.is_file()) if (work / "output").is_dir() else []
    with atomic.atomic_dir(out, OUTPUT_KIND) as tmp:
        for shard in shards:
            target = tmp / shard.relative_to(work / "output")
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(shard, target)  # the work dir may be removed next; the data is not copied
            except OSError:
                shutil.copy2(shard, target)
        reporting.write(tmp, report)
        atomic.write_text(tmp / "config.yaml", to_yaml(config))
        published = [tmp / s.relative_to(work / "output") for s in shards]
        lineage.write(tmp, OUTPUT_KIND, [lineage.raw_file(f) for f in expand_inputs(config.input.paths)],
                      lineage.file_hashes(tmp, published))
    return [str(out / s.relative_to(work / "output")) for s in shards]


def _init_ray(config: CurateConfig) -> None:
    ray = extras.require("ray", "executor.kind=ray")
    if not ray.is_initialized():
        if config.executor.ray_address:
            ray.init(address=config.executor.ray_address, log_to_driver=False)
        else:
            ray.init(num_cpus=config.executor.workers * config.executor.cpus_per_task,
                     include_dashboard=False, log_to_driver=False)
