"""Ray's ``serve`` command, plus the ``serve delete NAME`` the walkthrough uses.

The walkthrough tears down with ``serve delete RayServeLLM``, but Ray 2.60's
CLI has no ``delete`` (only ``serve shutdown``, which removes every app on the
cluster). The kit installs this module as the ``serve`` console script: Ray's
own command group, unchanged, with one more subcommand that calls the public
``serve.delete`` API.
"""

from __future__ import annotations

import os
import sys

import click
import ray
from ray import serve
from ray.serve.scripts import cli

from helpers.config import ConfigError
from helpers.serve.ray_private import SERVE_NAMESPACE


@cli.command(help="Delete one application (its deployments and replicas) by name.")
@click.argument("name")
@click.option(
    "--address",
    "-a",
    default=os.environ.get("RAY_ADDRESS", "auto"),
    show_default=True,
    help="Ray cluster address (the GCS address, or 'auto' for the local cluster).",
)
def delete(name: str, address: str) -> None:
    try:
        ray.init(address=address, namespace=SERVE_NAMESPACE, log_to_driver=False)
    except ConnectionError:
        raise click.ClickException(f"No Ray cluster is running at {address}.") from None
    if name not in serve.status().applications:
        raise click.ClickException(f"Application {name!r} is not running on this cluster.")
    serve.delete(name)
    click.echo(f"Deleted application {name!r}.")


def main() -> None:
    """Ray's commands, with two mistakes said in a line instead of a
    traceback: a bad variable, met when ``serve run`` imports the app, and no
    cluster to talk to (``serve status``, ``serve shutdown``)."""
    try:
        cli()
    except ConfigError as err:
        sys.exit(f"Error: {err}")
    except ConnectionError as err:
        sys.exit(f"Error: {err} Is a Ray cluster running? `make serve` or notebook 01 starts one.")


if __name__ == "__main__":
    main()
