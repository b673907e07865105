"""What a Ray worker imports before it runs any of our code.

Every model replica is a new Ray worker process, so whatever ``import ray``
pulls in is paid again on each cold start.
"""

from __future__ import annotations

import subprocess
import sys


def test_importing_ray_does_not_build_the_iri_parsers() -> None:
    """``make setup`` removes rfc3987-syntax, which jsonschema (imported by
    Ray) would otherwise load, building its parsers for 1.5 to 2.7 s here."""
    code = "import sys, ray; print('rfc3987_syntax' in sys.modules)"
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert loaded == "False", "rfc3987-syntax is installed: run `make setup` again"
