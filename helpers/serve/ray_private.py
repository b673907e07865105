"""Every use the kit makes of Ray's private APIs, and its one patch of Serve.

Whoever upgrades Ray checks this list, and nothing else in the kit:

- ``ray.serve._private.constants.SERVE_DEFAULT_APP_NAME``: the name ``serve
  run`` gives an app unless told otherwise (``default``).
- ``ray.serve._private.constants.SERVE_NAMESPACE``: the namespace Serve's
  controller lives in, which ``serve delete`` joins.
- ``serve.run`` is wrapped once by :func:`name_by_default` (below).
- The raylet's ``PrestartWorkers`` call, through Ray's generated gRPC stubs
  and its authenticating channel (:func:`prestart_worker_like_this_one`), and
  ``ray.experimental.internal_kv`` (:func:`kv_put` and its neighbours): the
  spare model process of :mod:`helpers.serve.spare_worker`, and the model
  replicas' reports (:mod:`helpers.serve.model_report`).
- ``ray._private.runtime_env.setup_hook.export_setup_func_module``
  (:func:`with_setup_hook`): what ``ray.init`` does to a runtime env's
  ``worker_process_setup_hook``, and Serve's replica options do not.

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

__all__ = [
    "SERVE_NAMESPACE",
    "kv_delete",
    "kv_get",
    "kv_has_prefix",
    "kv_put",
    "name_by_default",
    "prestart_worker_like_this_one",
    "with_setup_hook",
]

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


def prestart_worker_like_this_one(keep_alive_s: int) -> None:
    """Ask this node's raylet to start one idle Python worker with this
    process's runtime env, and to keep it ``keep_alive_s`` seconds rather than
    reap it as idle. Ray's public API has no such call; its own core worker
    makes it only for tasks, not actors.

    The worker is for no job in particular (the nil job id), so any job may
    be given it. Serve creates replicas in the job that started its
    controller, and a worker bound to that job would die with it: in the
    notebooks, that job is a kernel that has since exited."""
    import ray
    from ray import JobID
    from ray._private.grpc_utils import init_grpc_channel
    from ray.core.generated import common_pb2, node_manager_pb2, node_manager_pb2_grpc

    node = ray._private.worker.global_worker.node
    request = node_manager_pb2.PrestartWorkersRequest(
        language=common_pb2.PYTHON,
        job_id=JobID.nil().binary(),
        keep_alive_duration_secs=keep_alive_s,
        num_workers=1,
    )
    request.runtime_env_info.serialized_runtime_env = (
        ray.get_runtime_context().get_runtime_env_string()
    )
    channel = init_grpc_channel(f"{node.node_ip_address}:{node.node_manager_port}")
    try:
        node_manager_pb2_grpc.NodeManagerServiceStub(channel).PrestartWorkers(request, timeout=10)
    finally:
        channel.close()


def kv_put(key: str, value: str) -> None:
    """Store ``key`` in the cluster's KV store (GCS), where every node sees it."""
    from ray.experimental.internal_kv import _internal_kv_put

    _internal_kv_put(key, value)


def kv_get(key: str) -> bytes | None:
    from ray.experimental.internal_kv import _internal_kv_get

    return _internal_kv_get(key)


def kv_delete(key: str) -> None:
    from ray.experimental.internal_kv import _internal_kv_del

    _internal_kv_del(key)


def kv_has_prefix(prefix: str) -> bool:
    from ray.experimental.internal_kv import _internal_kv_list

    return bool(_internal_kv_list(prefix))


def with_setup_hook(runtime_env: dict[str, Any], hook: str) -> dict[str, Any]:
    """``runtime_env`` whose workers run ``hook`` (a function's import path)
    before they accept work. Ray's workers read the hook from an env var that
    ``ray.init`` and ``.options()`` derive from ``worker_process_setup_hook``,
    but Serve passes a deployment's runtime env to its replicas as it is."""
    from ray._private.runtime_env.setup_hook import export_setup_func_module

    copy = {**runtime_env, "env_vars": dict(runtime_env["env_vars"])}
    return export_setup_func_module(copy, hook)
