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
            "--check-prompts",
            "2",  # the 240-word prompts dominate the run on CPU
            "--layers",
            "4",  # the same code paths as 30 layers, in a fraction of the time
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    ready = re.findall(r"ready ([\d.]+) s after a fresh process started", result.stdout)
    assert len(ready) == 2 and all(float(seconds) > 0 for seconds in ready)
    assert re.search(r"first token, one request on an idle engine: [\d.]+ ms", result.stdout)
    agree = re.search(r"same greedy text from slots and the padded cache: (\d) of 2", result.stdout)
    assert agree and int(agree.group(1)) == 2  # on CPU, in fp32, the layouts agree exactly
    grown = re.search(r"past the slots' first capacity \(240-word .*: (\d) of 1", result.stdout)
    assert grown and int(grown.group(1)) == 1
    assert re.search(
        r"health checks during that pass, on another thread: \d+ passed$", result.stdout, re.M
    )
    assert re.search(r"walkthrough loop \(1 requests in turn\): [1-9]\d* tok/s", result.stdout)
    rows = re.findall(r"^\| (\d+) \| (\d+) \| [\d.]+ \| [\d.]+x \|$", result.stdout, re.M)
    assert [int(batch) for batch, _ in rows] == [1, 2]
    assert all(int(tok_s) > 0 for _, tok_s in rows)
