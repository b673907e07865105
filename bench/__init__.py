"""Benchmarks: each prints its figures beside a baseline measured in the same run.

``helpers`` is imported first, so the kit's Ray settings (loopback, token
authentication; :mod:`helpers.ray_env`) hold before any benchmark imports Ray,
however it was started.
"""

import helpers  # noqa: F401
