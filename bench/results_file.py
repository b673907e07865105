"""``bench/RESULTS.md``: where each benchmark command records what it measured,
in place of its previous run's figures.

Each section names its command, the machine and the versions, so a figure can
be rerun and compared with the same code on the same kind of machine.
"""

import os
import platform
import sys
from datetime import date
from importlib.metadata import version
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def provenance() -> str:
    """The command that ran, on what machine, with which versions."""
    command = f"python -m {_module()} {' '.join(sys.argv[1:])}"
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    versions = ", ".join(f"{p} {version(p)}" for p in ("torch", "transformers", "ray"))
    return f"`{command.strip()}` on {machine}; {versions}"


def _module() -> str:
    main = sys.modules["__main__"]
    spec = getattr(main, "__spec__", None)
    return spec.name if spec is not None else Path(sys.argv[0]).stem


def record_section(title: str, lines: list[str]) -> None:
    """Put ``## title, <today>`` and ``lines`` in RESULTS.md in place of the
    last run's section of that title (RESULTS.md keeps the latest figures;
    earlier ones are in git), or at the end if there is none yet."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    section = "\n".join([f"## {title}, {date.today().isoformat()}\n", *lines]) + "\n"
    start = text.find(f"\n## {title}, ")
    if start < 0:
        RESULTS.write_text(text.rstrip("\n") + "\n\n" + section)
        return
    end = text.find("\n## ", start + 1)
    rest = "" if end < 0 else text[end:]
    RESULTS.write_text(text[: start + 1] + section + rest)
