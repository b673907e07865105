"""Unit tests for helpers.serve.spare_worker: the key, the runtime env, the lock."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from helpers.config import ServeConfig
from helpers.serve import spare_worker
from helpers.serve.deployment_options import model_deployment_options


@pytest.fixture
def config() -> ServeConfig:
    return ServeConfig.from_env({})


def test_the_key_changes_with_any_setting_and_with_the_source(
    config: ServeConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = spare_worker.spare_key(config)
    assert spare_worker.spare_key(config) == key
    assert spare_worker.spare_key(replace(config, model_id="/models/other")) != key
    assert spare_worker.spare_key(replace(config, max_batch_size=4)) != key
    source = tmp_path / "helpers"
    (source / "engine").mkdir(parents=True)
    module = source / "engine" / "decoder.py"
    module.write_text("A = 1\n")
    monkeypatch.setattr(spare_worker, "KIT_SOURCE", source)
    before = spare_worker.spare_key(config)
    module.write_text("A = 22\n")
    assert spare_worker.spare_key(config) != before


def test_the_runtime_env_runs_the_setup_hook_and_carries_key_and_model(
    config: ServeConfig,
) -> None:
    env_vars = spare_worker.runtime_env("k1", config)["env_vars"]
    assert env_vars[spare_worker.KEY_VARIABLE] == "k1"
    assert config.model_id in env_vars[spare_worker.MODEL_VARIABLE]
    # Ray's workers read the hook from this variable, not from the option.
    assert env_vars["__RAY_WORKER_PROCESS_SETUP_HOOK_ENV_VAR"] == spare_worker.SETUP_HOOK


def test_only_spare_worker_on_gives_the_model_a_runtime_env(config: ServeConfig) -> None:
    with_spare = model_deployment_options(config, "k1")["ray_actor_options"]
    assert with_spare["runtime_env"] == spare_worker.runtime_env("k1", config)
    assert "runtime_env" not in model_deployment_options(config)["ray_actor_options"]


def test_the_setup_hook_does_nothing_outside_the_model_deployment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(spare_worker.KEY_VARIABLE, raising=False)
    started = []
    monkeypatch.setattr(spare_worker.threading, "Thread", lambda **kw: started.append(kw))
    spare_worker.prepare()
    assert started == []


def test_a_held_lock_names_its_process_and_a_released_one_nobody(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(spare_worker.tempfile, "gettempdir", lambda: str(tmp_path))
    assert spare_worker.spare_pid("k1") is None
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, tempfile, time; tempfile.gettempdir = lambda: sys.argv[1]; "
            "from helpers.serve import spare_worker; "
            "lock = spare_worker._try_lock('k1'); print(flush=True); time.sleep(60)",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        holder.stdout.readline()
        assert spare_worker.spare_pid("k1") == holder.pid
        # A second process cannot take it while the first holds it.
        assert spare_worker._try_lock("k1") is None
    finally:
        holder.kill()
        holder.wait()
    deadline = time.monotonic() + 10
    while spare_worker.spare_pid("k1") is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert spare_worker.spare_pid("k1") is None
    assert spare_worker._try_lock("k1") is not None
    assert os.path.exists(spare_worker.lock_path("k1"))
