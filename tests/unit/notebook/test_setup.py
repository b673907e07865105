"""The notebooks' one-call setup (helpers/notebook/setup.py), locally and as in Colab."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest

# Imported as a module: pytest would take a function named ``setup`` here for a
# module-level setup hook and call it.
from helpers.notebook import setup as kit_setup
from helpers.notebook.setup import HELD, colab_install_commands, held_constraints

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture
def ran(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[list[str]]:
    """Commands setup() runs, recorded instead of run; the folder restored after."""
    commands: list[list[str]] = []

    def record(command: list[str], check: bool) -> None:
        assert check
        commands.append(command)
        if "-c" in command:  # what the constraints file held while pip would run
            commands.append(Path(command[command.index("-c") + 1]).read_text().split())

    monkeypatch.setattr(subprocess, "run", record)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    return commands


def test_locally_it_installs_nothing_and_works_from_the_kit(ran: list) -> None:
    assert kit_setup.setup(REPO) == REPO
    assert ran == []
    assert Path.cwd() == REPO and str(REPO) in sys.path


def test_in_colab_it_installs_the_kit_and_the_model_holding_torch_and_jupyter(
    ran: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "google.colab", object())
    kit_setup.setup(REPO)
    kit, held_then, model, held_again = ran
    assert kit[-2:] == ["-e", str(REPO)]
    assert model[-2:] == ["--no-deps", kit_setup.EMBEDDED_MODEL]
    assert held_then == held_again == held_constraints()
    assert f"torch=={version('torch')}" in held_then
    assert f"ipykernel=={version('ipykernel')}" in held_then


@pytest.mark.parametrize("upgraded", [True, False])
def test_in_colab_a_package_replaced_while_imported_asks_for_a_restart(
    ran: list,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    upgraded: bool,
) -> None:
    """Colab imports some packages before the first cell (requests among
    them); the kit's pins may replace one, which the session only sees new
    after a restart."""
    monkeypatch.setitem(sys.modules, "google.colab", object())
    installed = {"requests": "2.0.0", "some-unimported-package": "1.0"}
    monkeypatch.setitem(sys.modules, "requests", sys.modules.get("requests") or object())

    def installed_version(name: str) -> str:
        if name not in installed:
            raise PackageNotFoundError(name)
        return installed[name]

    monkeypatch.setattr(kit_setup, "version", installed_version)
    real_run = subprocess.run

    def pip(command: list[str], check: bool) -> None:
        real_run(command, check=check)  # the fixture records it
        if upgraded:
            installed["requests"] = "2.32.0"
        installed["some-unimported-package"] = "2.0"

    monkeypatch.setattr(subprocess, "run", pip)
    kit_setup.setup(REPO)
    notice = capsys.readouterr().out
    assert ("imported already (requests): restart the session" in notice) == upgraded
    assert "some-unimported-package" not in notice


def test_a_name_several_packages_share_counts_only_the_package_imported(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Colab imports ``google.colab``; ``google`` is also protobuf's and
    google-auth's, whose upgrade must not ask for a restart."""
    imported_file = tmp_path / "shared" / "imported.py"
    imported_file.parent.mkdir()
    imported_file.write_text("")
    module = types.ModuleType("shared.imported")
    module.__file__ = str(imported_file)
    monkeypatch.setitem(sys.modules, "shared.imported", module)
    monkeypatch.setattr(
        kit_setup, "packages_distributions", lambda: {"shared": ["dist-a", "dist-b"]}
    )
    holds = {"dist-a": [imported_file], "dist-b": [tmp_path / "shared" / "other.py"]}
    monkeypatch.setattr(
        kit_setup,
        "distribution",
        lambda name: types.SimpleNamespace(
            files=[types.SimpleNamespace(locate=lambda path=path: path) for path in holds[name]]
        ),
    )
    monkeypatch.setattr(kit_setup, "version", lambda name: "1.0")
    assert kit_setup.imported_versions() == {"dist-a": "1.0"}


def test_only_installed_packages_are_held(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kit_setup, "HELD", ("torch", "not-a-package-anywhere"))
    assert held_constraints() == [f"torch=={version('torch')}"]


def test_every_colab_command_is_held_and_names_neither_torch_nor_jupyter(tmp_path: Path) -> None:
    for command in colab_install_commands(REPO, tmp_path / "held.txt"):
        assert command[command.index("-c") + 1] == str(tmp_path / "held.txt")
        assert not set(HELD) & {part.split("=")[0] for part in command}
    assert os.fspath(REPO) in colab_install_commands(REPO, tmp_path / "held.txt")[0]
