"""Unit tests for helpers.notebook.config_table: the configuration table and the GPU check."""

from __future__ import annotations

import shlex
import shutil
import warnings
from pathlib import Path

import pytest

from helpers.config import VARIABLES, ServeConfig
from helpers.notebook.config_table import config_markdown, config_rows, gpu_advice, gpu_names

ENVIRON = {"MAX_REPLICAS": "5", "TEMPERATURE": "0.2", "UNRELATED": "x"}


@pytest.fixture
def config() -> ServeConfig:
    return ServeConfig.from_env(ENVIRON)


def test_one_row_per_variable_in_order(config: ServeConfig) -> None:
    rows = config_rows(config, ENVIRON)
    assert [row["variable"] for row in rows] == [var.name for var in VARIABLES]
    assert len(rows) == len(VARIABLES)


def test_row_values_come_from_the_config(config: ServeConfig) -> None:
    values = config.as_env()
    rows = config_rows(config, ENVIRON)
    for row in rows:
        if row["variable"] != "API_KEY":
            assert row["value"] == values[row["variable"]]
    by_name = {row["variable"]: row for row in rows}
    assert by_name["MAX_REPLICAS"]["value"] == "5"
    assert by_name["TEMPERATURE"]["value"] == "0.2"


def test_row_metadata_comes_from_the_variables(config: ServeConfig) -> None:
    for row, var in zip(config_rows(config, ENVIRON), VARIABLES, strict=True):
        assert set(row) == {"variable", "value", "set", "default", "accepted", "meaning"}
        assert (row["default"], row["accepted"], row["meaning"]) == (
            var.default,
            var.accepted,
            var.meaning,
        )


def test_set_says_environment_or_default(config: ServeConfig) -> None:
    rows = config_rows(config, ENVIRON)
    for row in rows:
        expected = "environment" if row["variable"] in ENVIRON else "default"
        assert row["set"] == expected, row["variable"]
    assert sorted(r["variable"] for r in rows if r["set"] == "environment") == [
        "MAX_REPLICAS",
        "TEMPERATURE",
    ]


def test_empty_environ_is_all_defaults() -> None:
    rows = config_rows(ServeConfig.from_env({}), {})
    assert {row["set"] for row in rows} == {"default"}


def test_environ_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in VARIABLES:
        monkeypatch.delenv(var.name, raising=False)
    monkeypatch.setenv("MAX_NEW_TOKENS", "99")
    config = ServeConfig.from_env()
    by_name = {row["variable"]: row for row in config_rows(config)}
    assert by_name["MAX_NEW_TOKENS"] == {
        **by_name["MAX_NEW_TOKENS"],
        "value": "99",
        "set": "environment",
    }
    assert by_name["TOP_P"]["set"] == "default"


def test_markdown_has_a_header_and_a_line_per_variable(config: ServeConfig) -> None:
    lines = config_markdown(config, ENVIRON).split("\n")
    assert lines[0] == "| Variable | Value | From | Default | Accepted | Meaning |"
    assert lines[1] == "|---|---|---|---|---|---|"
    assert len(lines) == 2 + len(VARIABLES)
    values = {**config.as_env(), "API_KEY": "(not set)"}
    for line, var in zip(lines[2:], VARIABLES, strict=True):
        assert line.startswith(f"| `{var.name}` | `{values[var.name]}` | ")
        assert line.endswith(f" | {var.meaning} |")
    max_replicas = lines[2 + [var.name for var in VARIABLES].index("MAX_REPLICAS")]
    assert max_replicas.startswith("| `MAX_REPLICAS` | `5` | environment | `2` | ")
    top_p = lines[2 + [var.name for var in VARIABLES].index("TOP_P")]
    assert top_p.startswith("| `TOP_P` | `0.9` | default | `0.9` | ")


def test_markdown_rows_have_six_cells(config: ServeConfig) -> None:
    for line in config_markdown(config, ENVIRON).split("\n"):
        # No cell text contains a "|", so each line splits into exactly 6 cells.
        assert line.startswith("|") and line.endswith("|")
        assert len(line.split("|")) == 8, line


def fake_nvidia_smi(folder: Path, prints: str, exit_code: int = 0) -> str:
    """A real ``nvidia-smi`` program on a PATH of its own, printing ``prints``."""
    script = folder / "nvidia-smi"
    script.write_text(f"#!/bin/sh\nprintf '%s' {shlex.quote(prints)}\nexit {exit_code}\n")
    script.chmod(0o755)
    return str(folder)


def test_gpu_advice_without_a_gpu_warns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi there
    with pytest.warns(UserWarning, match="No GPU found") as record:
        message = gpu_advice(max_replicas=2)
    assert message.startswith("No GPU found")
    assert "CPU" in message
    assert "NUM_GPUS_PER_REPLICA" not in message
    assert [str(w.message) for w in record] == [message]


def test_a_driver_that_finds_no_gpu_counts_as_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", fake_nvidia_smi(tmp_path, "No devices were found", 6))
    assert gpu_names() == []


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has a GPU")
def test_gpu_advice_on_this_cpu_only_machine() -> None:
    with pytest.warns(UserWarning):
        message = gpu_advice(max_replicas=2)
    assert message == (
        "No GPU found: the model runs on the CPU (fine for the embedded 135M model)."
    )


def test_gpu_advice_with_a_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", fake_nvidia_smi(tmp_path, "Fake GPU\nFake GPU\n"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a GPU must not warn
        message = gpu_advice(max_replicas=2)
    assert "NUM_GPUS_PER_REPLICA=1 to serve on it." in message
    assert "(Fake GPU)" in message


def test_one_gpu_is_shared_by_max_replicas(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", fake_nvidia_smi(tmp_path, "Tesla T4\n"))
    assert gpu_advice(max_replicas=2) == (
        "GPU found (Tesla T4): set NUM_GPUS_PER_REPLICA=0.5 to serve on it, "
        "so MAX_REPLICAS=2 replicas share them."
    )


def test_the_api_key_is_never_shown() -> None:
    key = "do-not-show-0123456789"
    config = ServeConfig.from_env({"API_KEY": key})
    rows = {row["variable"]: row for row in config_rows(config, {"API_KEY": key})}
    assert rows["API_KEY"]["value"] == "(set, hidden)"
    assert key not in config_markdown(config, {"API_KEY": key})
