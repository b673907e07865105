"""Imports run one way: the ingress, the API and the notebook side never load
torch; the engine never loads Ray or a web framework.

The modules of one rule are imported one after another in a fresh
interpreter (an earlier import in this process would hide what a module pulls
in); the first after whose import a forbidden package is loaded is the one
that loads it.
"""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from types import ModuleType

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
