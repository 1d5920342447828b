"""Curation throughput: documents/s and MB/s per worker for the default recipe, and the cost of
lmforge's wrapper (audit ledgers, robust reader, report, atomic publish) against the same
datatrove steps run as a bare datatrove pipeline.

    .venv/bin/python benchmarks/curate_throughput.py [--workers 1 2] [--copies 1] [--repeats 2]

Input: the bundled corpus (290 Python-docs pages, 5 MB), `--copies` times with distinct ids
(copies beyond the first are exact duplicates, so the dedup stages have work). Each setting
runs `--repeats` times alternating lmforge and bare; the best wall time of each is reported.
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import importlib.metadata
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.sections import write_section  # noqa: E402
from lmforge.data.curate import CurateConfig  # noqa: E402
from lmforge.data.curate import pipeline as curate  # noqa: E402
from lmforge.data.curate.audit import Audited  # noqa: E402
from lmforge.data.curate.reader import CurationReader  # noqa: E402

CORPUS = ROOT / "lmforge" / "data" / "corpus" / "python_docs.jsonl.gz"


def make_input(directory: Path, copies: int, files: int) -> tuple[Path, int, int]:
    """The corpus `copies` times, split into `files` JSONL files: datatrove's own reader
    parallelises by file, so both sides get the same number of shards to spread over workers."""
    with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    lines = [json.dumps({"id": f"{r['id']}#{c}", "text": r["text"]}) + "\n" for c in range(copies) for r in records]
    folder = directory / "input"
    folder.mkdir(parents=True)
    for i in range(files):
        (folder / f"corpus-{i:02d}.jsonl").write_text("".join(lines[i::files]), encoding="utf-8")
    text_bytes = sum(len(r["text"].encode("utf-8")) for r in records) * copies
    return folder, len(lines), text_bytes


def bare_stages(config: CurateConfig, source: Path, work: Path) -> list:
    """lmforge's stages with the wrappers taken off and datatrove's own JsonlReader in front."""
    from datatrove.pipeline.readers import JsonlReader

    stages, _ = curate.build_stages(config, sorted(str(p) for p in source.glob("*.jsonl")), work)
    for stage in stages:
        stage.pipeline = [
            JsonlReader(str(source), glob_pattern="*.jsonl") if isinstance(step, CurationReader)
            else step.step if isinstance(step, Audited) else step
            for step in stage.pipeline
        ]
    return stages


def run_bare(config: CurateConfig, source: Path, work: Path) -> float:
    start = time.perf_counter()
    curate._quiet_datatrove()
    for stage in bare_stages(config, source, work):
        curate._executor(config, stage, work / "logs" / stage.name).run()
    return time.perf_counter() - start


def run_lmforge(config: CurateConfig) -> tuple[float, dict]:
    start = time.perf_counter()
    result = curate.run(config)
    return time.perf_counter() - start, result.report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--copies", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--files", type=int, default=2, help="input JSONL files (datatrove parallelises by file)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args()
    command = "python benchmarks/curate_throughput.py " + " ".join(sys.argv[1:])
    lines: list[str] = []

    def emit(line: str) -> None:
        print(line)
        lines.append(line)

    logging.basicConfig(level=logging.WARNING)
    root = Path(tempfile.mkdtemp(prefix="curate-bench-"))
    try:
        source, docs, text_bytes = make_input(root, args.copies, args.files)
        emit(f"input: {docs} documents, {text_bytes / 1e6:.2f} MB of text in {args.files} files; default recipe "
              f"(all filters, exact + MinHash dedup, 13-gram decontamination); cpus={os.cpu_count()}")
        # Warm-up: the first run in a process pays the imports (spaCy, datatrove's filters, the
        # moderation model); neither side of the comparison should.
        warm = CurateConfig.model_validate({"input": {"paths": [str(source)]}, "output": {"dir": str(root / "warm")},
                                            "executor": {"workers": 1}})
        run_lmforge(warm)
        run_bare(warm, source, root / "warm-bare")
        shutil.rmtree(root / "warm", ignore_errors=True)
        emit("")
        emit("| workers | lmforge s | docs/s | MB/s | docs/s/worker | MB/s/worker | bare datatrove s | overhead |")
        emit("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for workers in args.workers:
            best_lm = best_bare = float("inf")
            report = None
            for repeat in range(args.repeats):
                out = root / f"out-{workers}-{repeat}"
                config = CurateConfig.model_validate({
                    "input": {"paths": [str(source)]}, "output": {"dir": str(out)},
                    "executor": {"workers": workers},
                })
                seconds, report = run_lmforge(config)
                best_lm = min(best_lm, seconds)
                work = root / f"bare-{workers}-{repeat}"
                best_bare = min(best_bare, run_bare(config, source, work))
                shutil.rmtree(out, ignore_errors=True)
                shutil.rmtree(work, ignore_errors=True)
            rate, mbs = docs / best_lm, text_bytes / 1e6 / best_lm
            emit(f"| {workers} | {best_lm:.1f} | {rate:.1f} | {mbs:.2f} | {rate / workers:.1f} | {mbs / workers:.2f} | "
                  f"{best_bare:.1f} | {best_lm / best_bare - 1:+.1%} |")
        assert report is not None
        emit("")
        emit(f"kept {report['output']['docs']} of {docs} documents; stage seconds (last lmforge run): "
              + ", ".join(f"{k} {v:.1f}" for k, v in report["stage_seconds"].items()))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if not args.no_write:
        header = [
            "### Curation throughput: `lmforge curate` (default recipe) vs the same steps as a bare datatrove pipeline (CPU)",
            "",
            f"- command: `{command.strip()}`",
            f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; python {platform.python_version()}, "
            f"datatrove {importlib.metadata.version('datatrove')}",
            "- best of the repeats, lmforge and bare alternating; overhead = lmforge's wall time over bare datatrove's",
            "",
        ]
        write_section("curate_throughput", "\n".join(header + lines) + "\n")


if __name__ == "__main__":
    main()
