"""The Ray Serve LLM application: ``serve run ray_serve_app:deployment_graph``.

Importing this module reads the configuration from the environment once and
fails with a message naming the variable if a value is out of range; a
Hugging Face Hub ``MODEL_ID`` is downloaded here, before any replica starts.
Where a request goes from here: ``helpers/serve/app.py`` binds
``helpers/serve/ingress.py`` (HTTP) to ``helpers/serve/model_server.py`` (the
model replica), which drives ``helpers/engine/engine.py`` (the model) and its
continuous batcher, ``helpers/engine/batcher.py``.
"""

from helpers.config import APP_NAME, ServeConfig
from helpers.serve.app import build_app
from helpers.serve.ray_private import name_by_default

config = ServeConfig.from_env()
deployment_graph = name_by_default(build_app(config), APP_NAME)
