"""``bench/RESULTS.md``: where every benchmark command appends what it measured.

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


def append_section(title: str, lines: list[str]) -> None:
    """Add ``## title, <today>`` and ``lines`` to the end of RESULTS.md."""
    if not RESULTS.exists():
        RESULTS.write_text(
            "# Benchmark results\n\nAppended by the benchmark commands, newest last.\n"
        )
    with RESULTS.open("a") as out:
        out.write("\n".join([f"\n## {title}, {date.today().isoformat()}\n", *lines]) + "\n")
