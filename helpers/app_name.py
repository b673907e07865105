"""Give the application its walkthrough name, ``RayServeLLM``, wherever it runs.

The walkthrough deploys with ``serve run ray_serve_app:deployment_graph`` and
removes the app with ``serve delete RayServeLLM``. But ``serve run`` names an
application ``default`` unless ``--name`` is passed, and an ``Application``
object cannot carry a name of its own. So the module registers its app here,
and ``serve.run`` (which the CLI calls too) uses the registered name whenever
the caller left the name at Serve's default. An explicit name always wins.
"""

from __future__ import annotations

import functools
from typing import Any

from ray import serve
from ray.serve import Application
from ray.serve._private.constants import SERVE_DEFAULT_APP_NAME

_names: dict[int, str] = {}


def name_by_default(app: Application, name: str) -> Application:
    """Make ``serve.run(app)`` deploy ``app`` as ``name`` unless told otherwise."""
    _names[id(app)] = name
    if not getattr(serve.run, "_uses_registered_names", False):
        serve.run = _run_with_registered_names(serve.run)
    return app


def _run_with_registered_names(run: Any) -> Any:
    @functools.wraps(run)
    def wrapper(target: Application, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("name", SERVE_DEFAULT_APP_NAME) == SERVE_DEFAULT_APP_NAME:
            kwargs["name"] = _names.get(id(target), SERVE_DEFAULT_APP_NAME)
        return run(target, *args, **kwargs)

    wrapper._uses_registered_names = True  # type: ignore[attr-defined]
    return wrapper
