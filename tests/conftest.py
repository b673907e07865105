"""Shared test setup.

Ray reads some settings when it is first imported, so the loopback-only and
token-auth environment (the same as ``scripts/ray_env.sh``) is set here, before
any test module imports Ray.
"""

import os

os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
