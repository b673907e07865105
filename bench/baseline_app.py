"""The benchmark's walkthrough-style baseline as an app, for ``serve run``:
``scripts/serve.sh bench.baseline_app:app`` serves it as ``make serve`` serves
the kit's app. Importing this module reads the configuration and builds the
app, so the server lives in :mod:`bench.one_by_one_server`, which the
benchmarks import without doing either.
"""

from bench.one_by_one_server import OneByOneServer
from helpers.config import APP_NAME, ServeConfig
from helpers.serve.app import build_app
from helpers.serve.ray_private import name_by_default

app = name_by_default(build_app(ServeConfig.from_env(), OneByOneServer), APP_NAME)
