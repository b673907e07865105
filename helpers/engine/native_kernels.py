"""The CPU kernels' C sources, compiled once per machine into the user's cache.

Why C compiled here rather than shipped: each kernel is built for the
instructions this CPU has (AVX2, or AVX512-VNNI), which a wheel built
elsewhere could not assume, and a compiler is on every machine the kit runs
on. Where anything is missing (another CPU, no compiler, a cache that will
not load) the caller gets None and keeps a slower path that gives the same
products up to rounding.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import threading
from pathlib import Path

logger = logging.getLogger(__name__)


def compiled(
    source: Path, flags: tuple[str, ...], cpu_flags: tuple[str, ...]
) -> ctypes.CDLL | None:
    """``source`` compiled with ``flags`` and loaded, or None where it cannot
    run here (a CPU without every one of ``cpu_flags``, no working C compiler,
    a cache that will not load).

    Built with OpenMP where the compiler has it, so a replica given several
    CPUs splits each product between them, and without it otherwise. The
    library is named by a digest of the source and flags, so an edited kernel
    rebuilds and concurrent replicas never load a half-written file."""
    if not cpu_has(cpu_flags) or not source.is_file():
        return None
    builds: dict[Path, tuple[str, ...]] = {}  # preferred first; no OpenMP: the plain one
    for build_flags in ((*flags, "-fopenmp"), flags):
        digest = hashlib.sha256(source.read_bytes() + " ".join(build_flags).encode()).hexdigest()
        builds[kernels_dir() / f"{source.stem}-{digest[:16]}.so"] = build_flags
    # Any build already made first, so that a replica's start never retries
    # a build that failed before.
    built = (path for path, build_flags in builds.items() if _compile(source, path, build_flags))
    library = next((path for path in builds if path.is_file()), None) or next(built, None)
    if library is None:
        return None
    try:
        return ctypes.CDLL(str(library))
    except OSError as error:  # a cache on a noexec mount, say
        logger.warning("cannot load %s (%s): the slower path runs", library, error)
        return None


def kernels_dir() -> Path:
    """The compiled kernels' folder in the user's cache (``$XDG_CACHE_HOME`` or
    ``~/.cache``): replicas read it whatever ``MODEL_CACHE_DIR`` a deploy had."""
    return (
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        / "ray-serve-llm"
        / "kernels"
    )


def cpu_has(flags: tuple[str, ...]) -> bool:
    """Whether this CPU is x86-64 with every one of ``flags``, from Linux's
    /proc/cpuinfo."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    line = next((line for line in cpuinfo.splitlines() if line.startswith("flags")), "")
    return all(flag in line.split() for flag in flags)


def _compile(source: Path, library: Path, flags: tuple[str, ...]) -> bool:
    """Build ``library`` with ``flags``; False on any failure. It is written
    under a name of its own and renamed into place."""
    compiler = shlex.split(os.environ.get("CC", "cc"))
    if not compiler or shutil.which(compiler[0]) is None:
        logger.warning("no C compiler (cc): %s is not built, the slower path runs", source.name)
        return False
    partial = library.with_name(f"{library.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    try:
        library.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        command = [*compiler, *flags, str(source), "-o", str(partial)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
        if result.returncode != 0:
            logger.info("compiling %s with %s failed:\n%s", source.name, flags, result.stderr)
            return False
        os.replace(partial, library)
        return True
    except (OSError, subprocess.TimeoutExpired) as error:
        logger.warning("cannot build %s (%s): the slower path runs", library, error)
        return False
    finally:
        partial.unlink(missing_ok=True)
