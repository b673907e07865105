"""Where MODEL_ID can point: the hub cache (offline), a directory, a GGUF file."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.config import EMBEDDED_MODEL_ID, ServeConfig
from helpers.engine.embedded_model import ensure_converted
from helpers.engine.engine import resolve_model_source
from helpers.engine.errors import ModelLoadError

HUB_ID = "kit-test/smollm2-from-cache"
REVISION = "0123456789abcdef0123456789abcdef01234567"


def lay_out_hub_cache(hub_dir: Path, model_dir: Path) -> None:
    """Arrange files the way huggingface_hub does: blobs, snapshots, refs."""
    repo = hub_dir / f"models--{HUB_ID.replace('/', '--')}"
    snapshot = repo / "snapshots" / REVISION
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    for index, source in enumerate(sorted(p for p in model_dir.iterdir() if p.is_file())):
        if source.name.startswith("."):
            continue
        blob = repo / "blobs" / f"blob{index:04d}"
        os.symlink(source, blob)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / source.name)


def load_in_subprocess(model_id: str, hub_dir: Path) -> subprocess.CompletedProcess[str]:
    # huggingface_hub reads HF_HUB_CACHE when first imported, so a fresh
    # interpreter is the honest way to point it at a new cache.
    code = (
        "import sys; from pathlib import Path; from helpers.engine.engine import Engine, "
        "GenerationRequest as R, Sampling as S; e = Engine.load(sys.argv[1], Path(sys.argv[2]), "
        "cpu_threads=1); print(e.info.implementation); "
        "print(e.generate([R('The capital of France is', S(4, 0.0, 1.0))])[0].text)"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(hub_dir), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-c", code, model_id, str(hub_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.fixture(scope="module")
def converted() -> Path:
    return ensure_converted(ServeConfig.from_env({}).model_cache_dir)


def test_a_hub_id_loads_offline_from_the_hub_cache(tmp_path: Path, converted: Path) -> None:
    lay_out_hub_cache(tmp_path / "hub", converted)
    result = load_in_subprocess(HUB_ID, tmp_path / "hub")
    assert result.returncode == 0, result.stderr[-2000:]
    implementation, text = result.stdout.strip().split("\n", 1)
    assert implementation == "kit-decoder"
    assert text.strip()


def test_a_hub_id_missing_from_the_cache_fails_offline(tmp_path: Path) -> None:
    (tmp_path / "hub").mkdir()
    result = load_in_subprocess("kit-test/not-cached", tmp_path / "hub")
    assert result.returncode != 0
    assert "kit-test/not-cached" in result.stderr
    assert "cannot be loaded" in result.stderr


def test_sources_resolve_by_kind(
    tmp_path: Path, converted: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache_dir = converted.parent
    assert resolve_model_source(EMBEDDED_MODEL_ID, cache_dir) == str(converted)
    assert resolve_model_source(str(converted), cache_dir) == str(converted)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    with pytest.raises(ModelLoadError, match="MODEL_ID='facebook/opt-125m' cannot be loaded"):
        resolve_model_source("facebook/opt-125m", cache_dir)  # a hub id goes to the hub cache
    with pytest.raises(FileNotFoundError, match=r"missing\.gguf"):
        resolve_model_source(str(tmp_path / "missing.gguf"), cache_dir)
