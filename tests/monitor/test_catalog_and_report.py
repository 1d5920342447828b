"""`lmforge runs` and `lmforge report` on real tiny runs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.errors import DataError
from lmforge.monitor import catalog
from lmforge.monitor.report import CURVES, render
from lmforge.train import trainer
from lmforge.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def two_runs(trained_run, pretrain_data, tmp_path_factory) -> list[Path]:
    """The shared trained run and a shorter sibling with a different learning rate."""
    root = tmp_path_factory.mktemp("runs")
    shutil.copytree(trained_run, root / "base")
    config = TrainConfig.model_validate({
        "run": {"name": "lr-sweep", "out_dir": str(root), "seed": 3},
        "model": {"preset": "tiny", "max_seq_len": 128},
        "data": {"dataset": str(pretrain_data["tokens"]), "seq_len": 64},
        "optim": {"lr": 1e-3},
        "schedule": {"warmup_steps": 2},
        "train": {"max_steps": 150, "global_batch_tokens": 1024, "micro_batch_size": 8, "device": "cpu",
                  "eval_every": 150, "eval_batches": 2, "checkpoint_every": 0, "progress": False},
    })
    trainer.run(config)
    return [root / "base", root / "lr-sweep"]


def lmforge(*args):
    return subprocess.run([sys.executable, "-m", "lmforge", *args], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "COLUMNS": "200", "LMFORGE_LOG_LEVEL": "WARNING"})


def test_runs_are_listed_and_summarized_from_their_files(two_runs):
    assert catalog.find_runs(two_runs[0].parent) == sorted(two_runs)
    summary = catalog.summarize(two_runs[0])
    assert (summary.status, summary.step, summary.max_steps, summary.kind) == ("completed", 150, 150, "pretrain")
    assert summary.tokens == 150 * 1024 and summary.checkpoint == "step-0000150"
    records = [json.loads(line) for line in (two_runs[0] / "metrics.jsonl").read_text().splitlines()]
    assert summary.last_loss == [r["loss"] for r in records if "loss" in r][-1]
    assert summary.best_val_loss == min(r["val_loss"] for r in records if "val_loss" in r)
    listed = lmforge("runs", "list", str(two_runs[0].parent))
    assert listed.returncode == 0 and "lr-sweep" in listed.stdout and "base" in listed.stdout


def test_runs_compare_shows_only_the_keys_that_differ(two_runs):
    summaries = [catalog.summarize(p) for p in two_runs]
    differences = dict(catalog.config_differences(summaries))
    assert "optim.lr" in differences and differences["optim.lr"] == [0.003, 0.001]
    assert "model.dim" not in differences and "run.name" not in differences
    assert set(differences) <= {"optim.lr", "run.out_dir"}
    shown = lmforge("runs", "compare", *map(str, two_runs))
    assert shown.returncode == 0 and "optim.lr" in shown.stdout and "model.dim" not in shown.stdout


def test_a_missing_run_dir_is_a_one_line_error(tmp_path):
    with pytest.raises(DataError, match="not a run dir"):
        catalog.summarize(tmp_path)
    done = lmforge("runs", "show", str(tmp_path / "nope"))
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith(f"error: {tmp_path / 'nope'}") and "is not a run dir" in lines[0]


def test_report_embeds_every_curve_and_renders_in_headless_chromium(two_runs, tmp_path):
    page = render(two_runs[0], tmp_path / "report")
    text = page.read_text()
    assert text.count("data:image/png;base64,") == len(CURVES)
    assert all((tmp_path / "report" / f"{name}.png").stat().st_size > 5000 for name, _, _ in CURVES)
    assert "step-0000150" in text and "dataset manifest sha256" in text
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (apt install chromium)")
    shot = tmp_path / "shot.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=1200,2400", page.as_uri()], capture_output=True, timeout=90)
    from matplotlib import image

    pixels = image.imread(shot)[..., :3]
    assert pixels.shape[0] == 2400 and pixels.std() > 0.05  # not a blank page
    # Chart lines are saturated blue (matplotlib's C0): their pixels are on the page.
    blue = (pixels[..., 2] > 0.6) & (pixels[..., 0] < 0.3)
    assert blue.sum() > 500
