"""The llama-server comparison: its verdicts, and how it finds or builds its opponent."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.llama_server import BuildToolsMissing, binary_path, ensure_built, server
from bench.servers import Outcome
from bench.versus_llamacpp import ratio_table
from helpers.config import ServeConfig
from helpers.engine.embedded_model import gguf_path


def outcome(name: str, concurrency: int, tokens: int, seconds: float) -> Outcome:
    return Outcome(name, concurrency, 8, tokens, seconds, [seconds])


def test_each_ratio_is_of_the_mean_tokens_per_s_and_is_judged_against_its_target() -> None:
    ours = [outcome("app", 1, 300, 10), outcome("app", 1, 500, 10), outcome("app", 16, 900, 10)]
    theirs = [outcome("llama", 1, 500, 10), outcome("llama", 16, 800, 10)]
    rows = ratio_table(ours, theirs, [1, 16]).splitlines()[2:]
    assert rows == [
        "| 1 | 40.0 | 50.0 | 0.80x | >= 0.8x: met |",
        "| 16 | 90.0 | 80.0 | 1.12x | >= 1x: met |",
    ]
    slower = ratio_table([outcome("app", 16, 700, 10)], theirs, [16]).splitlines()[2]
    assert slower.endswith("| 0.88x | >= 1x: missed |")


def test_a_machine_without_cmake_gets_told_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no cmake, no compiler
    config = ServeConfig.from_env({"MODEL_CACHE_DIR": str(tmp_path / "cache")})
    with pytest.raises(BuildToolsMissing, match=r"cmake and c\+\+.*apt-get install cmake g\+\+"):
        ensure_built(config)


def test_a_cached_build_is_reused_and_served_on_loopback_with_the_embedded_gguf(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = ServeConfig.from_env({"MODEL_CACHE_DIR": str(tmp_path)})
    binary = binary_path(config)
    binary.parent.mkdir(parents=True)
    binary.write_text("")
    monkeypatch.setenv("PATH", str(tmp_path))  # a build would fail here: none is attempted
    assert ensure_built(config) == binary
    command = server(config, threads=2).command
    assert command[0] == str(binary)
    assert command[command.index("--model") + 1] == str(gguf_path())
    assert command[command.index("--host") + 1] == "127.0.0.1"
    assert command[command.index("--threads") + 1] == "2"
