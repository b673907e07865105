"""llama.cpp's own ``llama-server``, built once from source, as a benchmark opponent.

    python -m bench.llama_server          (builds it, prints its path)

The source is the llama.cpp that the ``llama-cpp-python`` sdist vendors, pinned
below, so the opponent is the same code on every machine that reruns the
comparison, and comes from the package index like everything else here. It is
built for this CPU (``GGML_NATIVE``) into the kit's model cache and reused until
that pin changes. Nothing in the build reaches the network: the sdist comes
through pip, the web UI is left out, and so are HTTPS and downloads.

It serves the very GGUF file the embedded model is converted from
(:func:`helpers.engine.embedded_model.gguf_path`), through its
OpenAI-compatible ``/v1/completions``, with continuous batching.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from bench.servers import THEIRS_URL, Server
from helpers.config import ServeConfig
from helpers.engine.embedded_model import GGUF_FILE, gguf_path

SDIST = "llama-cpp-python==0.3.36"
"""Whose vendored llama.cpp is built: the pin names the llama.cpp revision."""

SLOTS = 16
"""``-np``: sequences decoded together, as many as the kit's ``MAX_BATCH_SIZE``."""

CONTEXT_PER_SLOT = 1024
"""Each slot's share of ``-c``: prompts and 64-token completions fit many times."""

CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DGGML_NATIVE=ON",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_OPENSSL=OFF",
)


class BuildToolsMissing(RuntimeError):
    """CMake or a C++ compiler is not installed: the comparison cannot run here."""


def binary_path(config: ServeConfig) -> Path:
    """Where the build for :data:`SDIST` lives in the kit's cache."""
    version = SDIST.split("==")[1]
    return config.model_cache_dir / "bench" / f"llama-server-{version}" / "llama-server"


def ensure_built(config: ServeConfig) -> Path:
    """The ``llama-server`` binary, built first if the cache has none.

    Raises :class:`BuildToolsMissing`, naming what to install, where CMake or
    a compiler is missing."""
    binary = binary_path(config)
    if binary.is_file():
        return binary
    missing = [tool for tool in ("cmake", "c++") if shutil.which(tool) is None]
    if missing:
        raise BuildToolsMissing(
            f"building llama-server needs {' and '.join(missing)} "
            "(on Debian: apt-get install cmake g++)"
        )
    with tempfile.TemporaryDirectory(prefix="llama-server-") as folder:
        work = Path(folder)
        source = _vendored_source(work)
        build = work / "build"
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        _run(["cmake", "-S", str(source), "-B", str(build), *generator, *CMAKE_OPTIONS])
        jobs = str(os.cpu_count() or 1)
        _run(["cmake", "--build", str(build), "--target", "llama-server", "-j", jobs])
        binary.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(build / "bin" / "llama-server", binary)
    return binary


def server(config: ServeConfig, threads: int) -> Server:
    """``llama-server`` on the embedded model's GGUF file, ``threads`` CPU threads."""
    port = THEIRS_URL.rsplit(":", 1)[1]
    command = [
        str(ensure_built(config)),
        *("--model", str(gguf_path())),
        *("--alias", GGUF_FILE),
        *("--host", "127.0.0.1", "--port", port),
        *("--threads", str(threads), "--parallel", str(SLOTS), "--cont-batching"),
        *("--ctx-size", str(SLOTS * CONTEXT_PER_SLOT)),
        "--no-webui",
    ]
    name = f"llama-server -t {threads} -np {SLOTS} -cb"
    return Server("llamacpp", name, command, THEIRS_URL, "/health", GGUF_FILE, stop_timeout_s=15)


def _vendored_source(work: Path) -> Path:
    """The sdist's ``vendor/llama.cpp``, unpacked under ``work``."""
    pip = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"]
    _run([*pip, "--no-binary", ":all:", "--dest", str(work), SDIST])
    (archive,) = work.glob("*.tar.gz")
    with tarfile.open(archive) as sdist:
        sdist.extractall(work, filter="data")
    (source,) = work.glob("*/vendor/llama.cpp")
    return source


def _run(command: list[str]) -> None:
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    try:
        print(ensure_built(ServeConfig.from_env()))
    except BuildToolsMissing as missing:
        sys.exit(str(missing))


if __name__ == "__main__":
    main()
