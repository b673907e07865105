"""``make clean``'s list of what the kit writes outside the clone."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers.engine import kit_files

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("MODEL_CACHE_DIR", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def fill(files: list[kit_files.KitFile]) -> None:
    for file in files:
        file.path.parent.mkdir(parents=True, exist_ok=True)
        if file.path.suffix in (".lock", "") and "auth_token" not in file.path.name:
            file.path.mkdir(exist_ok=True)
            (file.path / "content").write_text("x")
        else:
            file.path.write_text("x")


def test_clean_removes_what_only_the_kit_uses_and_keeps_rays_token(home: Path) -> None:
    files = kit_files.kit_files()
    fill(files)
    (home / ".cache" / "huggingface").mkdir()
    removed, left = kit_files.remove(files, ray_token=False)
    assert [file.path for file in left] == [home / ".ray" / "auth_token"]
    assert {file.path for file in removed} == {f.path for f in files if f.only_the_kit}
    assert not (home / ".cache" / "ray-serve-llm").exists()
    assert (home / ".ray" / "auth_token").is_file()
    assert (home / ".cache" / "huggingface").is_dir()


def test_rays_token_goes_only_on_request(home: Path) -> None:
    files = kit_files.kit_files()
    fill(files)
    removed, left = kit_files.remove(files, ray_token=True)
    assert left == [] and not (home / ".ray" / "auth_token").exists()
    assert len(removed) == len(files)


def test_a_shared_model_cache_folder_keeps_what_is_not_the_kits(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shared = home / "models"
    monkeypatch.setenv("MODEL_CACHE_DIR", str(shared))
    files = kit_files.kit_files()
    fill(files)
    (shared / "someone-elses-model").mkdir()
    kit_files.remove(files, ray_token=False)
    assert sorted(path.name for path in shared.iterdir()) == ["someone-elses-model"]


def test_the_readme_names_every_path(home: Path) -> None:
    readme = (REPO / "README.md").read_text()
    for file in kit_files.kit_files():
        if file.path.suffix != ".lock":
            assert f"~/{file.path.relative_to(home)}" in readme, file.path
