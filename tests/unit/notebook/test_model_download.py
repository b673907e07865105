"""helpers.notebook.model_download: notebook 02's fetch step, with nothing to fetch.

Downloads themselves are tested against a fake hub in tests/unit/engine/test_hub.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers.engine.errors import ModelLoadError
from helpers.notebook.model_download import fetch_model


def test_the_embedded_model_needs_no_download(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("MODEL_ID", raising=False)
    files = fetch_model()
    assert files.embedded and files.directory is None
    assert "nothing to download" in capsys.readouterr().out


def test_a_local_directory_is_used_as_it_is(tmp_path: Path) -> None:
    files = fetch_model(str(tmp_path))
    assert not files.embedded and files.directory == tmp_path
    assert "nothing to download" in files.note


def test_the_configured_model_id_is_read_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("MODEL_ID", str(tmp_path))
    assert fetch_model().directory == tmp_path


def test_a_model_that_cannot_be_fetched_is_named() -> None:
    with pytest.raises(
        ModelLoadError, match=r"^MODEL_ID='/nonexistent/model-dir' cannot be loaded"
    ):
        fetch_model("/nonexistent/model-dir")
