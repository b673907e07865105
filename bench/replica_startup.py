"""Print, as JSON, how the running model replica's start went.

    python -m bench.replica_startup

A separate process on purpose: a benchmark that stayed connected to the
cluster as a Ray driver would change what it measures (Ray starts workers for
every driver), so the cold-start benchmark asks through this script and lets
it exit.
"""

import json
from dataclasses import asdict

from helpers.config import APP_NAME
from helpers.notebook.cluster import connect


def main() -> None:
    connect()  # sets Ray's environment, which Ray reads when first imported
    from ray import serve

    from helpers.serve.model_calls import MODEL_DEPLOYMENT

    handle = serve.get_deployment_handle(MODEL_DEPLOYMENT, app_name=APP_NAME)
    print(json.dumps(asdict(handle.startup_times.remote().result(timeout_s=60))))


if __name__ == "__main__":
    main()
