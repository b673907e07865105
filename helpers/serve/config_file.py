"""The Serve config file for ``serve deploy``: what ``serve build`` writes, made
safe and complete.

    python -m helpers.serve.config_file            # rewrites deploy/serve_config.yaml
    python -m helpers.serve.config_file --check    # exits 1 if the committed file drifted

``serve build ray_serve_app:deployment_graph`` records the application and its
deployments. Four things are changed after it:

- the application is named ``RayServeLLM`` (``serve build`` says ``app1``);
- Serve's HTTP proxy binds 127.0.0.1 (``serve build`` writes 0.0.0.0, which
  would publish the API, unauthenticated, on every interface);
- the application's runtime environment carries the configuration variables
  with their defaults, because ``ray_serve_app`` reads them where it is
  imported: on the cluster. Edit them there. ``API_KEY`` is left out (a secret
  belongs in the cluster's environment or a Kubernetes Secret, not in git), and
  so is ``MODEL_CACHE_DIR`` (a path on the machine that built the file);
- the deployments keep only their names. ``serve build`` copies every option
  the code derived from the variables (replicas, autoscaling, limits), and
  options in the file override the code: a changed ``MAX_REPLICAS`` in the
  runtime environment would then be ignored by the autoscaler. Left out, the
  options come from the variables, one place to edit. Add an option under a
  deployment only to override it on purpose.

The build runs with none of the variables set, so the file shows the defaults
whatever the shell that runs it has exported.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from helpers.config import APP_NAME, VARIABLES

IMPORT_PATH = "ray_serve_app:deployment_graph"
CONFIG_PATH = Path(__file__).resolve().parents[2] / "deploy" / "serve_config.yaml"
NOT_IN_FILE = {"API_KEY", "MODEL_CACHE_DIR"}
HEADER = (
    "# Made by `python -m helpers.serve.config_file` from `serve build "
    f"{IMPORT_PATH}`;\n# a test fails when it drifts. Deploy with: "
    "serve deploy deploy/serve_config.yaml\n"
)


def default_variables() -> dict[str, str]:
    return {var.name: var.default for var in VARIABLES if var.name not in NOT_IN_FILE}


def built_config() -> dict[str, Any]:
    """Run ``serve build`` with the defaults and return what it wrote."""
    env = {k: v for k, v in os.environ.items() if k not in {var.name for var in VARIABLES}}
    with tempfile.TemporaryDirectory() as scratch:
        output = Path(scratch) / "built.yaml"
        subprocess.run(
            [sys.executable, "-m", "helpers.serve.cli", "build", IMPORT_PATH, "-o", str(output)],
            env=env,
            check=True,
            capture_output=True,
            text=True,
            timeout=300,
        )
        return yaml.safe_load(output.read_text())


def serve_config() -> dict[str, Any]:
    config = built_config()
    config["http_options"]["host"] = "127.0.0.1"
    (application,) = config["applications"]
    application["name"] = APP_NAME
    application["runtime_env"] = {"env_vars": default_variables()}
    application["deployments"] = [{"name": d["name"]} for d in application["deployments"]]
    return config


def render(config: dict[str, Any]) -> str:
    return HEADER + "\n" + yaml.safe_dump(config, sort_keys=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="fail if the file drifted")
    args = parser.parse_args()
    text = render(serve_config())
    if not args.check:
        CONFIG_PATH.write_text(text)
        print(f"wrote {CONFIG_PATH}")
    elif CONFIG_PATH.read_text() != text:
        sys.exit(
            f"{CONFIG_PATH} differs from what `serve build` gives now: run "
            "`python -m helpers.serve.config_file` and commit the result"
        )


if __name__ == "__main__":
    main()
