"""The notebooks as files: committed clean, on the python3 kernel, asserting their lesson."""

import json
import re
from pathlib import Path

import pytest
import yaml

from tests import pyproject

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


def cells(path: Path, kind: str) -> list[str]:
    notebook = json.loads(path.read_text())
    return ["".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == kind]


def test_there_are_numbered_notebooks() -> None:
    assert len(NOTEBOOKS) >= 6
    numbers = [p.name[:2] for p in NOTEBOOKS]
    assert numbers == [f"{i:02d}" for i in range(1, len(NOTEBOOKS) + 1)]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_outputs_are_stripped(path: Path) -> None:
    for cell in json.loads(path.read_text())["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_kernel_is_python3(path: Path) -> None:
    assert json.loads(path.read_text())["metadata"]["kernelspec"]["name"] == "python3"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_the_shape_every_notebook_shares(path: Path) -> None:
    markdown = cells(path, "markdown")
    code = cells(path, "code")
    assert "colab-badge.svg" in markdown[0] and "What you will learn" in markdown[0]
    assert "Prerequisites" in markdown[0]
    assert "setup(ROOT)" in code[0], "the first code cell is the setup cell"
    assert len(code[0].splitlines()) <= 20, "the setup cell finds the kit, then calls setup()"
    assert any(m.startswith("## Check") for m in markdown)
    assert any(m.startswith("## Recap") for m in markdown)
    assert any(line.startswith("assert ") for c in code for line in c.splitlines()), "no assert"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_colab_asks_for_a_gpu_and_never_installs_torch(path: Path) -> None:
    assert json.loads(path.read_text())["metadata"]["accelerator"] == "GPU"
    assert "pip" not in cells(path, "code")[0], "installs belong to helpers/notebook/setup.py"


def test_every_notebook_has_the_same_setup_cell() -> None:
    assert len({cells(path, "code")[0] for path in NOTEBOOKS}) == 1


def test_the_setup_cell_away_from_the_kit_without_kit_repo_url_says_what_to_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As in a fresh Colab runtime that skipped the README's first step: the
    kit is neither here nor cloned yet, so the cell has nothing to clone."""
    if Path("/content/ray-serve-llm-kit").exists():
        pytest.skip("a kit is cloned where Colab keeps it: the cell would use it")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KIT_REPO_URL", raising=False)
    with pytest.raises(SystemExit, match="%env KIT_REPO_URL="):
        exec(cells(NOTEBOOKS[0], "code")[0], {})


def test_readme_links_every_notebook() -> None:
    readme = (REPO / "README.md").read_text()
    for path in NOTEBOOKS:
        assert f"notebooks/{path.name}" in readme


def test_environment_yml_agrees_with_pyproject() -> None:
    project = pyproject.project()
    extras = project["optional-dependencies"]
    # A run-time range the lab extra pins (ipywidgets) appears once, pinned.
    wanted = {_name(r): r for r in project["dependencies"]}
    wanted |= {_name(r): r for r in [*extras["lab"], *extras["test"]]}
    environment = yaml.safe_load((REPO / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in environment["dependencies"] if isinstance(d, dict))
    assert set(pip_section) - {"torch==2.13.0"} == set(wanted.values())
    assert any(str(d).startswith("python=") for d in environment["dependencies"])
    assert environment["channels"] == ["conda-forge"]


def _name(requirement: str) -> str:
    return re.split(r"[=<>\[]", requirement, maxsplit=1)[0]
