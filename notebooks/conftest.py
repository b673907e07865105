"""Leave nothing running after the notebook suite, even when a notebook fails.

The notebooks share a Ray cluster started with ``ray start`` (a separate
process) and stop it in notebook 06; if a notebook fails before that, this
hook stops it. It runs only when the session collected notebooks, and without
asking ``ray status`` first: a cluster whose GCS hangs while shutting down
(seen once here) no longer answers it, yet must still be stopped, or its
stale address makes the next ``ray.init()`` wait for a dead cluster.
"""

from helpers.notebook.cluster import stop_cluster


def pytest_sessionfinish(session, exitstatus) -> None:
    if any(item.nodeid.endswith(".ipynb") for item in session.items):
        stop_cluster()
