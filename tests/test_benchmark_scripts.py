"""benchmarks/gpu_figures.sh --quick: the scripts that take the GPU figures run end to end at toy sizes on the CPU
and print every figure docs/performance.md records, so that a session with a GPU does not spend its device time on
a broken script. Nothing here is timed."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_figures.sh"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHON": sys.executable})


def test_every_part_runs_and_prints_its_figures(tmp_path):
    result = _run("--quick", str(tmp_path))
    assert result.returncode == 0, result.stderr
    failed = sorted(path.name for path in tmp_path.glob("*.stderr.txt"))
    assert not failed, (failed, [path.read_text()[-2000:] for path in tmp_path.glob("*.stderr.txt")])
    fp32 = (tmp_path / "train_step_fp32.txt").read_text()
    for method in ("seq_ft_sl", "slca"):
        assert re.search(rf"{method}\s+plain\s+[\d.]+ img/s\s+slca_kit\s+[\d.]+ img/s\s+ratio \d\.\d{{3}} "
                         rf"\[\d\.\d{{3}}, \d\.\d{{3}}\] \(target >= 0\.97 at fp32\)", fp32), fp32
    fast = (tmp_path / "train_step_fast.txt").read_text()
    assert "slca_kit in bf16, slca_kit optimizer fused, compile eager" in fast
    assert "target >= 1.8 on a GPU" in fast and re.search(r"MFU \d+\.\d%", fast), fast
    assert re.search(r"speed-up \d+\.\d\dx", (tmp_path / "ca_stage.txt").read_text())
    pipeline = (tmp_path / "data_pipeline.txt").read_text()
    assert len(re.findall(r"best loader [\d.]+ images/s -> the bottleneck is the (model|loader)", pipeline)) == 4


def test_an_unknown_part_is_refused_before_any_work(tmp_path):
    result = _run("--quick", str(tmp_path / "out"), "train_step", "ca_stage")
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: unknown PART 'train_step'; valid: train_step_fp32 train_step_fast "
                                     "ca_stage data_pipeline")
    assert not (tmp_path / "out").exists()
