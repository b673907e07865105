"""The GPU benchmark script, run on CPU so that it cannot rot unnoticed here."""

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_gpu_benchmark_runs_its_random_weight_model_on_cpu() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.gpu_engine",
            "--device",
            "cpu",
            "--batches",
            "1",
            "2",
            "--max-tokens",
            "4",
            "--loop-requests",
            "1",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert re.search(r"ready [\d.]+ s after the script started", result.stdout)
    assert re.search(r"first token, one request on an idle engine: [\d.]+ ms", result.stdout)
    rows = re.findall(r"^\| (\d+) \| (\d+) \| (\d+) \| [\d.]+x \|$", result.stdout, re.M)
    assert [int(batch) for batch, _, _ in rows] == [1, 2]
    assert all(int(ours) > 0 and int(loop) > 0 for _, ours, loop in rows)
