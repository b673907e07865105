"""What the kit writes outside the clone, and ``make clean``'s removal of it.

Why a list of its own: state kept in a user's home outlives the clone and
hides missing setup steps (a converted model made long ago never shows that
the conversion broke). Everything listed here is remade on demand, so
removing it is always safe; what other software shares is removed only on
request, or left with a word on where it is.

    python -m helpers.engine.kit_files                        list
    python -m helpers.engine.kit_files --remove               remove what only the kit uses
    python -m helpers.engine.kit_files --remove --ray-token   and Ray's token too
"""

from __future__ import annotations

import argparse
import shutil
from dataclasses import dataclass
from pathlib import Path

from helpers.config import ServeConfig
from helpers.engine.embedded_model import CONVERTED_NAME
from helpers.engine.gguf_checkpoint import CACHED_GGUF_DIR
from helpers.engine.native_kernels import kernels_dir

RAY_TOKEN = Path("~/.ray/auth_token")
KIT_FOLDER = "ray-serve-llm"  # the default cache folder's name: removed once empty


@dataclass(frozen=True)
class KitFile:
    """One path the kit writes, and who else may use it."""

    path: Path
    what: str
    only_the_kit: bool


def kit_files() -> list[KitFile]:
    cache = ServeConfig.from_env().model_cache_dir
    return [
        KitFile(cache / CONVERTED_NAME, "the embedded model, converted", True),
        KitFile(cache / f"{CONVERTED_NAME}.lock", "its conversion lock", True),
        KitFile(cache / CACHED_GGUF_DIR, "GGUF files served as MODEL_ID, converted", True),
        KitFile(kernels_dir(), "the CPU kernels, compiled for this machine", True),
        KitFile(
            RAY_TOKEN.expanduser(), "Ray's token (any Ray cluster started here uses it)", False
        ),
    ]


def remove(files: list[KitFile], ray_token: bool) -> tuple[list[KitFile], list[KitFile]]:
    """Remove what only the kit uses, and Ray's token if asked; return what was
    removed and what was left. The kit's own cache folder goes too once empty."""
    removed, left = [], []
    for file in (file for file in files if file.path.exists()):
        if not (file.only_the_kit or ray_token):
            left.append(file)
        elif file.path.is_dir():
            shutil.rmtree(file.path)
            removed.append(file)
        else:
            file.path.unlink()
            removed.append(file)
    for folder in {file.path.parent for file in files if file.only_the_kit}:
        if folder.name == KIT_FOLDER and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    return removed, left


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--remove", action="store_true", help="remove what only the kit uses")
    parser.add_argument("--ray-token", action="store_true", help="with --remove: Ray's token too")
    args = parser.parse_args(argv)
    files = kit_files()
    if not args.remove:
        for file in files:
            state = "present" if file.path.exists() else "absent"
            print(f"{file.path}  ({file.what}; {state})")
        return 0
    removed, left = remove(files, args.ray_token)
    for file in removed:
        print(f"removed {file.path} ({file.what})")
    for file in left:
        print(f"left {file.path} ({file.what}): `make clean RAY_TOKEN=1` removes it")
    print(
        "left as they are: the Hugging Face cache (~/.cache/huggingface, hub models), "
        "Jupyter's settings (~/.jupyter, ~/.local/share/jupyter), matplotlib's font cache "
        "(~/.cache/matplotlib) and Ray's session logs (/tmp/ray), which other software shares"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
