"""The Ray settings every process of the kit runs with, applied on import of
:mod:`helpers`, before any of its modules imports Ray.

Why on import: Ray reads some of them when it is first imported, and the kit
is entered in ways no script of ours precedes (a JupyterLab the user already
runs, Colab, ``pytest --nbmake notebooks``, the ``serve`` command). A
notebook kernel that imported Ray without them would look for the cluster at
the machine's network address while it listens on 127.0.0.1, and wait there.
``scripts/ray_env.sh`` exports this same list for Ray's own ``ray`` command.
"""

from __future__ import annotations

import os
import shlex

RAY_ENV = {
    # The ray/serve CLIs send the cluster's token only when this is set.
    "RAY_AUTH_MODE": "token",
    # Despite its name: bind every port of a local cluster to 127.0.0.1.
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    # How often each Ray process reports its metrics to the export port
    # (Ray: every 10 s). Every 2 s, a burst in notebook 06 plots as a curve,
    # not two steps; a Prometheus scraping every 15 s sees no difference.
    "RAY_metrics_report_interval_ms": "2000",
}


def apply_ray_env() -> None:
    """Put :data:`RAY_ENV` into this process's environment."""
    os.environ.update(RAY_ENV)


def shell_exports() -> str:
    """:data:`RAY_ENV` as ``export`` lines, for ``scripts/ray_env.sh``."""
    return "\n".join(f"export {name}={shlex.quote(value)}" for name, value in RAY_ENV.items())
