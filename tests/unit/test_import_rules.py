"""Imports run one way: the ingress, the API and the notebook side never load
torch; the engine never loads Ray or a web framework; and the kit's own
packages import down their layers, never up or across.

For third-party packages, the modules of one rule are imported one after
another in a fresh interpreter (an earlier import in this process would hide
what a module pulls in); the first after whose import a forbidden package is
loaded is the one that loads it. The kit's own imports are read from the
source instead, every one of them: an import inside a function or under
``TYPE_CHECKING`` runs later or never, so importing the module would miss it,
yet it still ties one package to another.
"""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

import helpers
from helpers import api, engine, notebook, serve


def modules(package: ModuleType) -> list[str]:
    return [f"{package.__name__}.{m.name}" for m in pkgutil.iter_modules(package.__path__)]


def first_to_load(modules: list[str], forbidden: tuple[str, ...]) -> tuple[str, list[str]] | None:
    """The first module after whose import a forbidden package was loaded, and
    those packages; None when every module kept the rule."""
    code = (
        "import importlib, json, sys\n"
        "found = {}\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        f"    found[name] = [p for p in {forbidden!r} if p in sys.modules]\n"
        "print(json.dumps(found))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    loaded = json.loads(result.stdout.splitlines()[-1])
    return next(((name, found) for name, found in loaded.items() if found), None)


def test_the_ingress_api_and_notebook_side_never_import_torch() -> None:
    torch_free = [
        "helpers.protocol",
        "helpers.config",
        "helpers.serve.ingress",
        "helpers.serve.model_server",
        "helpers.serve.app",
        "ray_serve_app",
        *modules(api),
        *modules(notebook),
    ]
    assert first_to_load(torch_free, ("torch", "transformers")) is None


def test_the_engine_never_imports_ray_or_a_web_framework() -> None:
    assert first_to_load(modules(engine), ("ray", "fastapi", "starlette")) is None


def test_the_api_never_imports_ray() -> None:
    assert first_to_load(modules(api), ("ray",)) is None


def test_every_package_says_what_it_owns_and_may_import() -> None:
    for package in (helpers, api, engine, notebook, serve):
        assert package.__doc__ and "import" in package.__doc__, package.__name__


KIT_LAYERS: tuple[tuple[str, ...], ...] = (
    ("helpers.protocol", "helpers.config", "helpers.ray_env"),
    ("helpers", "helpers.api", "helpers.engine"),
    ("helpers.serve",),
    ("helpers.notebook",),
)
"""The kit's units from the bottom up (DESIGN.md, "imports running one way").
A module may import its own unit and the units of lower layers, never one of
its own layer or above: the API and the engine know nothing of each other nor
of Serve, Serve nothing of the notebooks, and the shared modules at the bottom
(the cross-process types, the configuration, Ray's settings) nothing of the
kit. ``helpers/__init__.py`` runs before any of them is imported, so it may
import the bottom layer only."""

RANK = {unit: rank for rank, layer in enumerate(KIT_LAYERS) for unit in layer}


def unit_of(module: str) -> str:
    """The layered unit a kit module belongs to: a subpackage, or a top-level module."""
    return ".".join(module.split(".")[:2])


def kit_imports(source: str, module: str, is_package: bool) -> Iterator[tuple[int, str]]:
    """The line and name of each kit module ``source`` imports, wherever the
    import stands; a ``from`` import yields ``package.name``, so that
    ``from helpers import serve`` names the unit it reaches."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against the importing module's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name == "helpers" or name.startswith("helpers."):
                yield node.lineno, name


def layer_breaks(source: str, module: str, is_package: bool = False) -> list[str]:
    """Each import in ``source`` (the code of ``module``) that reaches a unit
    of its own layer or one above."""
    unit = unit_of(module)
    return [
        f"{module}:{line} imports {name}"
        for line, name in kit_imports(source, module, is_package)
        if unit_of(name) != unit and RANK[unit_of(name)] >= RANK[unit]
    ]


def kit_sources(root: Path) -> Iterator[tuple[str, Path, bool]]:
    """Module name, file and whether it is a package's ``__init__``, for every
    module of the ``helpers`` package at ``root``."""
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        is_package = parts[-1] == "__init__"
        yield ".".join(parts[:-1] if is_package else parts), path, is_package


def test_every_kit_module_is_in_a_layer() -> None:
    """A new top-level module or subpackage must be placed before it can be checked."""
    units = {unit_of(module) for module, _, _ in kit_sources(Path(helpers.__file__).parent)}
    assert units - RANK.keys() == set()


def test_the_kit_packages_import_down_their_layers_only() -> None:
    breaks = [
        found
        for module, path, is_package in kit_sources(Path(helpers.__file__).parent)
        for found in layer_breaks(path.read_text(encoding="utf-8"), module, is_package)
    ]
    assert breaks == []


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("helpers.api.x", "from helpers.serve.ingress import Ingress\n"),
        ("helpers.api.x", "def later() -> None:\n    import helpers.engine.engine\n"),
        ("helpers.api.x", "from ..notebook import client\n"),
        ("helpers.engine.x", "from helpers import serve\n"),
        ("helpers.engine.x", "if TYPE_CHECKING:\n    from helpers.api.errors import ApiError\n"),
        ("helpers.serve.x", "from helpers.notebook.client import LLMClient\n"),
        ("helpers.protocol", "from helpers.config import ServeConfig\n"),
    ],
    ids=[
        "api to serve",
        "in a function",
        "relative",
        "engine to serve",
        "type checking",
        "serve to notebook",
        "protocol to config",
    ],
)
def test_an_import_up_or_across_the_layers_is_caught(module: str, source: str) -> None:
    assert len(layer_breaks(source, module)) == 1


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("helpers.serve.x", "from helpers.api.errors import ApiError\nimport helpers.engine\n"),
        ("helpers.notebook.x", "from helpers.serve.app import build_app\n"),
        ("helpers.api.x", "from . import errors\nfrom helpers.protocol import Grammar\n"),
        ("helpers.engine.x", "from helpers.config import ServeConfig\n"),
    ],
    ids=["serve to api and engine", "notebook to serve", "own package", "engine to config"],
)
def test_an_import_down_the_layers_passes(module: str, source: str) -> None:
    assert layer_breaks(source, module) == []
