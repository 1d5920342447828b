"""The prepared GPU benchmark (`benchmarks/train_gpu.py`) runs its whole code path on CPU, so a lent
GPU machine's few minutes are not spent finding a bug in it: FSDP2 in a one-process group, the
training step, the engine's eager and compiled decode, and the report."""

from __future__ import annotations

import pytest


def test_the_gpu_benchmark_runs_end_to_end_on_cpu_with_a_tiny_model(tmp_path, capsys):
    pytest.importorskip("torch.distributed.fsdp")
    from benchmarks import train_gpu

    out = tmp_path / "BENCHMARKS.md"
    assert train_gpu.main(["--device", "cpu", "--presets", "tiny", "--variants", "fsdp,eager", "--steps", "2",
                           "--warmup", "1", "--seq-len", "64", "--decode-batch", "4", "--decode-prompt", "16",
                           "--decode-tokens", "8", "--out", str(out)]) == 0
    report = out.read_text()
    assert "<!-- train_gpu:start -->" in report and "failed" not in report
    rows = [line for line in report.splitlines() if line.startswith("| tiny |")]
    assert len(rows) == 4  # two training variants, eager and compiled decode
    assert all(float(row.split("|")[5].replace(",", "")) > 0 for row in rows[:2])  # training tokens/s
    assert all(float(row.split("|")[4].replace(",", "")) > 0 for row in rows[2:])  # decode tokens/s
