"""Every use the kit makes of Ray's private APIs, and its one patch of Serve.

Whoever upgrades Ray checks this list, and nothing else in the kit:

- ``ray.serve._private.constants.SERVE_DEFAULT_APP_NAME``: the name ``serve
  run`` gives an app unless told otherwise (``default``).
- ``ray.serve._private.constants.SERVE_NAMESPACE``: the namespace Serve's
  controller lives in, which ``serve delete`` joins.
- ``serve.run`` is wrapped once by :func:`name_by_default` (below).

Why the patch: the walkthrough deploys with ``serve run ray_serve_app:deployment_graph`` and
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
from ray.serve._private.constants import SERVE_DEFAULT_APP_NAME, SERVE_NAMESPACE

__all__ = ["SERVE_NAMESPACE", "name_by_default"]

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
