"""What ``make serve`` checks before it starts anything.

A bad variable, or a port another program holds, would otherwise surface
after a Ray cluster has started, as a traceback (or, for the dashboard's port,
not at all: Ray moves it to the next one), followed by the teardown of what
was just started. Checked first, each is one line naming the variable or the
port, and nothing is left to stop.

    python -m helpers.serve.preflight [--new-cluster]
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from collections.abc import Mapping

from helpers.config import ConfigError, ServeConfig

CLUSTER_PORTS = {6379: "Ray's GCS", 8000: "Serve's HTTP proxy", 8265: "Ray's dashboard"}
"""Ports on 127.0.0.1 that a Ray cluster started here takes."""


def port_open(host: str, port: int, timeout_s: float = 1.0) -> bool:
    """Whether something accepts TCP connections at ``host:port``. A connect,
    not a bind: a port that a stopped server left in TIME_WAIT is free."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def problems(environ: Mapping[str, str], ports: Mapping[int, str] | None = None) -> list[str]:
    """Everything that would stop the app serving: the configuration's first
    error, then each of ``ports`` that something already listens on (pass
    :data:`CLUSTER_PORTS` when a cluster is about to start)."""
    found = []
    try:
        ServeConfig.from_env(environ)
    except ConfigError as err:
        found.append(str(err))
    found += [
        f"port {port} ({name}) on 127.0.0.1 is taken: stop what holds it, or the "
        "Ray cluster that does (`ray stop`, or notebook 06's stop_cluster())"
        for port, name in (ports or {}).items()
        if port_open("127.0.0.1", port)
    ]
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--new-cluster", action="store_true", help="also check the ports a new cluster takes"
    )
    args = parser.parse_args()
    found = problems(os.environ, CLUSTER_PORTS if args.new_cluster else None)
    for problem in found:
        print(f"make serve: {problem}", file=sys.stderr)
    sys.exit(2 if found else 0)


if __name__ == "__main__":
    main()
