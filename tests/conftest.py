"""Shared test setup.

Ray reads some settings when it is first imported, so the loopback-only and
token-auth environment (the same as ``scripts/ray_env.sh``) is set here, before
any test module imports Ray. The interpreter's own bin directory goes first on
PATH, as in an activated virtual environment, so tests that run the ``ray``
and ``serve`` commands get this environment's.
"""

import os
import sys
from pathlib import Path

os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"

os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
