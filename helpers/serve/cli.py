"""Ray's ``serve`` command, plus the ``serve delete NAME`` the walkthrough uses.

The walkthrough tears down with ``serve delete RayServeLLM``, but Ray 2.60's
CLI has no ``delete`` (only ``serve shutdown``, which removes every app on the
cluster). The kit installs this module as the ``serve`` console script: Ray's
own command group, unchanged, with one more subcommand that calls the public
``serve.delete`` API.
"""

from __future__ import annotations

import os

import click
import ray
from ray import serve
from ray.serve.scripts import cli

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
    ray.init(address=address, namespace=SERVE_NAMESPACE, log_to_driver=False)
    if name not in serve.status().applications:
        raise click.ClickException(f"Application {name!r} is not running on this cluster.")
    serve.delete(name)
    click.echo(f"Deleted application {name!r}.")


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
