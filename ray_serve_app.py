"""The Ray Serve LLM application: ``serve run ray_serve_app:deployment_graph``.

Importing this module reads the configuration from the environment once and
fails with a message naming the variable if a value is out of range. Where a
request goes from here: ``helpers/serve_app.py`` binds ``helpers/ingress.py``
(HTTP) to ``helpers/llm_server.py`` (batching), which drives
``helpers/engine.py`` (the model).
"""

from helpers.app_name import name_by_default
from helpers.config import APP_NAME, ServeConfig
from helpers.serve_app import build_app

config = ServeConfig.from_env()
deployment_graph = name_by_default(build_app(config), APP_NAME)
