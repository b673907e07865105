"""Leave nothing running after the notebook suite, even when a notebook fails.

The notebooks share a Ray cluster started with ``ray start`` (a separate
process) and stop it in notebook 06; if a notebook fails before that, this
hook stops it. It runs only when the session collected notebooks.
"""

from helpers.cluster import cluster_running, ray_command


def pytest_sessionfinish(session, exitstatus) -> None:
    if any(item.nodeid.endswith(".ipynb") for item in session.items) and cluster_running():
        ray_command("stop", timeout_s=300)
