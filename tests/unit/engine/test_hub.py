"""helpers.engine.hub against a fake hub on loopback: no network, no model.

huggingface_hub reads ``HF_ENDPOINT``, ``HF_HOME`` and ``HF_HUB_OFFLINE`` when it
is imported (and the test session sets ``HF_HUB_OFFLINE=1``), so every call
that may reach the hub runs in a fresh interpreter with its own environment.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers.config import EMBEDDED_MODEL_ID
from helpers.engine.errors import ModelLoadError
from helpers.engine.hub import is_complete, is_hub_id, serving_files, snapshot_directory
from tests.fake_hub import FakeHub, FakeRepo, run_with_hub

TOKEN = "hf_fake_token_for_tests"

# Each file's bytes differ: the client stores equal files as one blob, fetched once.
SERVING = {
    "config.json": b'{"model_type": "llama"}',
    "generation_config.json": b'{"do_sample": false}',
    "model.safetensors": b"\0" * 4096,
    "tokenizer.json": b'{"version": "1.0"}',
    "tokenizer_config.json": b'{"tokenizer_class": "PreTrainedTokenizerFast"}',
}
EXTRAS = {
    "pytorch_model.bin": b"pickle",
    "consolidated.safetensors": b"\1" * 64,
    "model.gguf": b"GGUF",
    "onnx/model.onnx": b"onnx",
    "README.md": b"# tiny",
}
BIN_ONLY = {
    "config.json": b'{"model_type": "opt"}',
    "pytorch_model.bin": b"pickle",
    "vocab.json": b'{"a": 0}',
    "merges.txt": b"#version: 0.2",
    "tf_model.h5": b"h5",
}

RESOLVE = """
import json, sys
from helpers.engine.errors import ModelLoadError
from helpers.engine.hub import snapshot_directory
try:
    print(json.dumps({"directory": str(snapshot_directory(sys.argv[1]))}))
except ModelLoadError as err:
    print(json.dumps({"error": str(err)}))
"""


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    repos = {
        "kit/tiny": FakeRepo({**SERVING, **EXTRAS}),
        "kit/gated": FakeRepo(dict(SERVING), gated_token=TOKEN),
        "kit/bin-only": FakeRepo(dict(BIN_ONLY)),
        "kit/gguf-only": FakeRepo({"config.json": b"{}", "tokenizer.json": b"{}", "m.gguf": b"G"}),
    }
    with FakeHub(repos) as running:
        yield running


def resolve(model_id: str, home: Path, endpoint: str, **env: str) -> dict[str, str]:
    """``snapshot_directory(model_id)`` in a fresh interpreter: its directory or its error."""
    return run_with_hub(RESOLVE, [model_id], home, endpoint, 120, **env)


def unreachable_endpoint() -> str:
    """A loopback port nobody listens on: connections are refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def lay_out_cache(hub_cache: Path, repo_id: str, files: dict[str, bytes]) -> Path:
    """A cache entry as huggingface_hub writes one: refs/main, blobs, symlinked snapshot."""
    storage = hub_cache / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    (storage / "refs").mkdir(parents=True)
    (storage / "refs" / "main").write_text(commit)
    snapshot = storage / "snapshots" / commit
    (storage / "blobs").mkdir()
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        blob = storage / "blobs" / hashlib.sha1(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


@pytest.fixture(scope="module")
def downloaded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str], list[str]]:
    """``kit/tiny`` downloaded into an empty HF_HOME, by a hub stopped since:
    that home, the result and the files whose bytes the hub sent."""
    home = tmp_path_factory.mktemp("hf_home")
    with FakeHub({"kit/tiny": FakeRepo({**SERVING, **EXTRAS})}) as hub:
        found = resolve("kit/tiny", home, hub.url)
    return home, found, hub.fetched()


def test_a_hub_id_downloads_into_an_empty_cache(
    downloaded: tuple[Path, dict[str, str], list[str]],
) -> None:
    home, found, _ = downloaded
    directory = Path(found["directory"])
    assert directory.is_relative_to(home / "hub" / "models--kit--tiny" / "snapshots")
    assert {p.name for p in directory.iterdir()} == set(SERVING)
    assert (directory / "model.safetensors").read_bytes() == SERVING["model.safetensors"]
    assert is_complete(directory)


def test_only_the_files_serving_reads_are_fetched(
    downloaded: tuple[Path, dict[str, str], list[str]],
) -> None:
    _, _, fetched = downloaded
    assert sorted(fetched) == sorted(SERVING)
    assert not set(fetched) & set(EXTRAS)  # no .bin, .gguf, onnx/, consolidated.*


def test_a_second_call_reads_the_cache_alone(
    downloaded: tuple[Path, dict[str, str], list[str]],
) -> None:
    home, first, _ = downloaded
    gone = unreachable_endpoint()  # the hub that served the download is stopped
    assert resolve("kit/tiny", home, gone, HF_HUB_OFFLINE="1") == first
    assert resolve("kit/tiny", home, gone) == first  # online allowed: still the cache alone


def test_a_repository_without_safetensors_gets_its_pytorch_weights(
    hub: FakeHub, tmp_path: Path
) -> None:
    directory = Path(resolve("kit/bin-only", tmp_path, hub.url)["directory"])
    assert {p.name for p in directory.iterdir()} == set(BIN_ONLY) - {"tf_model.h5"}


def test_a_cache_laid_out_by_the_hub_client_is_found_offline(tmp_path: Path) -> None:
    snapshot = lay_out_cache(tmp_path / "hub", "org/cached-model", SERVING)
    found = resolve("org/cached-model", tmp_path, unreachable_endpoint(), HF_HUB_OFFLINE="1")
    assert Path(found["directory"]) == snapshot


def test_offline_with_an_empty_cache_names_the_id_and_touches_no_network(
    hub: FakeHub, tmp_path: Path
) -> None:
    found = resolve("kit/tiny", tmp_path, hub.url, HF_HUB_OFFLINE="1")
    assert found["error"].startswith("MODEL_ID='kit/tiny' cannot be loaded: ")
    assert "HF_HUB_OFFLINE=1" in found["error"]
    assert hub.requests == []


def test_a_partial_cache_entry_is_not_taken_for_the_model(tmp_path: Path) -> None:
    lay_out_cache(tmp_path / "hub", "org/partial", {"config.json": SERVING["config.json"]})
    found = resolve("org/partial", tmp_path, unreachable_endpoint(), HF_HUB_OFFLINE="1")
    assert found["error"].startswith("MODEL_ID='org/partial' cannot be loaded: ")


def test_a_gated_repository_needs_HF_TOKEN(hub: FakeHub, tmp_path: Path) -> None:
    refused = resolve("kit/gated", tmp_path, hub.url)
    assert refused["error"].startswith("MODEL_ID='kit/gated' cannot be loaded: ")
    assert "gated" in refused["error"] and "set HF_TOKEN" in refused["error"]

    found = resolve("kit/gated", tmp_path, hub.url, HF_TOKEN=TOKEN)
    assert {p.name for p in Path(found["directory"]).iterdir()} == set(SERVING)


def test_an_unknown_repository_is_named(hub: FakeHub, tmp_path: Path) -> None:
    found = resolve("kit/no-such-model", tmp_path, hub.url)
    assert found["error"].startswith("MODEL_ID='kit/no-such-model' cannot be loaded: ")
    assert "no repository" in found["error"]


def test_a_repository_without_weights_the_engine_reads_is_named(
    hub: FakeHub, tmp_path: Path
) -> None:
    found = resolve("kit/gguf-only", tmp_path, hub.url)
    assert found["error"].startswith("MODEL_ID='kit/gguf-only' cannot be loaded: ")
    assert "no model*.safetensors or pytorch_model*.bin weights" in found["error"]
    assert hub.fetched() == []


def test_an_unreachable_hub_and_an_empty_cache_name_the_id(tmp_path: Path) -> None:
    found = resolve("kit/tiny", tmp_path, unreachable_endpoint())
    assert found["error"].startswith("MODEL_ID='kit/tiny' cannot be loaded: ")
    assert "not in the Hugging Face cache" in found["error"]
    assert "cannot be reached" in found["error"]


@pytest.mark.parametrize("model_id", ["/nonexistent/model-dir", "a/b/c", "../up"])
def test_an_id_that_is_neither_a_path_nor_a_hub_id_is_named(model_id: str) -> None:
    with pytest.raises(ModelLoadError) as caught:
        snapshot_directory(model_id)
    assert str(caught.value).startswith(f"MODEL_ID={model_id!r} cannot be loaded: ")
    assert "hub id" in str(caught.value)


def test_what_counts_as_a_hub_id(tmp_path: Path) -> None:
    (tmp_path / "weights.gguf").write_bytes(b"GGUF")
    assert is_hub_id("Qwen/Qwen2.5-0.5B-Instruct")
    assert is_hub_id("gpt2")
    assert is_hub_id("/nonexistent/model-dir")  # refused by snapshot_directory, by name
    assert not is_hub_id(EMBEDDED_MODEL_ID)
    assert not is_hub_id(str(tmp_path))
    assert not is_hub_id(str(tmp_path / "weights.gguf"))
    assert not is_hub_id("/missing/weights.gguf")  # the engine names a missing GGUF file


def test_serving_files_prefer_safetensors_and_skip_other_copies() -> None:
    repo = [
        *SERVING,
        *EXTRAS,
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "original/consolidated.00.pth",
        "chat_template.jinja",
    ]
    chosen = serving_files(repo)
    assert "model.safetensors.index.json" in chosen
    assert "model-00002-of-00002.safetensors" in chosen and "chat_template.jinja" in chosen
    assert not set(chosen) & {*EXTRAS, "original/consolidated.00.pth"}
    assert serving_files(BIN_ONLY) == [
        "config.json",
        "merges.txt",
        "pytorch_model.bin",
        "vocab.json",
    ]


def test_a_sharded_snapshot_is_complete_only_with_every_shard(tmp_path: Path) -> None:
    index = {
        "weight_map": {
            "a": "model-00001-of-00002.safetensors",
            "b": "model-00002-of-00002.safetensors",
        }
    }
    for name, data in {
        **SERVING,
        "model.safetensors.index.json": json.dumps(index).encode(),
    }.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"1")
    assert not is_complete(tmp_path)
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"2")
    assert is_complete(tmp_path)


def test_the_deploy_time_fetch_skips_local_models_and_reports_a_failure_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from helpers.serve.app import fetch_hub_model

    assert fetch_hub_model(EMBEDDED_MODEL_ID) is None
    assert fetch_hub_model(str(tmp_path)) is None
    assert capsys.readouterr().err == ""
    assert fetch_hub_model("/nonexistent/model-dir") is None  # the replica reports it again
    warning = capsys.readouterr().err
    assert warning.startswith("Warning: MODEL_ID='/nonexistent/model-dir' cannot be loaded: ")
    assert warning.count("\n") == 1
