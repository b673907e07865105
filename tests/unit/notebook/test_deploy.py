"""The notebooks' deploy helpers, without Ray: the share of a GPU each replica
asks for on a GPU cluster (what lets notebook 05's burst scale out on Colab's
one GPU), overrides checked before they reach the environment, which app
states ensure_deployed replaces, and a delete that is safe to run again."""

import os
from dataclasses import dataclass, field
from subprocess import CompletedProcess
from types import SimpleNamespace

import pytest
from click.testing import CliRunner
from ray import serve
from ray.serve.schema import ApplicationStatus

from helpers.config import APP_NAME, ConfigError, ServeConfig
from helpers.notebook import deploy
from helpers.notebook.config_table import gpus_per_replica


@pytest.mark.parametrize(
    ("gpus", "max_replicas", "share"),
    [
        pytest.param(1, 2, 0.5, id="colab: two replicas share its GPU"),
        pytest.param(1, 1, 1.0, id="one replica, one GPU"),
        pytest.param(1, 3, 0.3333, id="thirds, rounded down as Ray counts"),
        pytest.param(2, 2, 1.0, id="a GPU each"),
        pytest.param(8, 2, 1.0, id="never more than one: the engine uses one device"),
        pytest.param(3, 4, 0.75, id="three GPUs for four replicas"),
    ],
)
def test_max_replicas_fit_the_clusters_gpus(gpus: float, max_replicas: int, share: float) -> None:
    assert gpus_per_replica(gpus, max_replicas) == share
    assert gpus_per_replica(gpus, max_replicas) * max_replicas <= gpus


def test_the_share_follows_max_replicas_until_a_user_sets_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(deploy, "_cluster_gpus", lambda: 1.0)
    monkeypatch.setattr(deploy, "_chosen_share", None)
    monkeypatch.delenv("NUM_GPUS_PER_REPLICA", raising=False)
    monkeypatch.setenv("MAX_REPLICAS", "2")
    deploy._share_the_gpus()
    assert os.environ["NUM_GPUS_PER_REPLICA"] == "0.5"
    monkeypatch.setenv("MAX_REPLICAS", "1")  # a later deploy with other overrides
    deploy._share_the_gpus()
    assert os.environ["NUM_GPUS_PER_REPLICA"] == "1"
    monkeypatch.setenv("NUM_GPUS_PER_REPLICA", "0.25")  # the user's own
    monkeypatch.setenv("MAX_REPLICAS", "2")
    deploy._share_the_gpus()
    assert os.environ["NUM_GPUS_PER_REPLICA"] == "0.25"


def test_a_cluster_without_gpus_asks_for_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(deploy, "_cluster_gpus", lambda: 0.0)
    monkeypatch.setattr(deploy, "_chosen_share", None)
    monkeypatch.delenv("NUM_GPUS_PER_REPLICA", raising=False)
    deploy._share_the_gpus()
    assert "NUM_GPUS_PER_REPLICA" not in os.environ


# -- deploy's overrides, checked before they reach the environment ------------------------------


@dataclass
class NoRay:
    """What deploy asked of the stand-ins for Ray."""

    connects: int = 0
    ran: list[ServeConfig] = field(default_factory=list)


@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch) -> NoRay:
    """Stand-ins for Ray: connecting is counted, the cluster has no GPU, and
    each deploy's config is recorded instead of run."""
    calls = NoRay()

    def connect() -> None:
        calls.connects += 1

    monkeypatch.setattr(deploy, "connect", connect)
    monkeypatch.setattr(deploy, "_cluster_gpus", lambda: 0.0)
    monkeypatch.setattr(deploy, "_chosen_share", None)
    monkeypatch.setattr(deploy, "run_app", calls.ran.append)
    return calls


def test_a_refused_override_leaves_the_environment_as_it_was(
    monkeypatch: pytest.MonkeyPatch, no_ray: NoRay
) -> None:
    """It used to stay in os.environ, so every later deploy in that kernel
    failed on a value no cell showed any more."""
    monkeypatch.setenv("MAX_REPLICAS", "1")
    monkeypatch.setenv("MAX_NEW_TOKENS", "256")
    before = dict(os.environ)
    with pytest.raises(ConfigError, match="MAX_REPLICAS='two'"):
        deploy.deploy({"MAX_NEW_TOKENS": "32", "MAX_REPLICAS": "two"})
    assert dict(os.environ) == before
    assert (no_ray.connects, no_ray.ran) == (0, [])  # refused before starting a cluster


def test_an_override_that_is_not_text_is_refused_by_name(
    monkeypatch: pytest.MonkeyPatch, no_ray: NoRay
) -> None:
    monkeypatch.setenv("MAX_REPLICAS", "1")
    before = dict(os.environ)
    with pytest.raises(TypeError, match=r"quote \['MAX_REPLICAS'\]"):
        deploy.deploy({"MAX_REPLICAS": 2})  # type: ignore[dict-item]
    assert dict(os.environ) == before
    assert (no_ray.connects, no_ray.ran) == (0, [])


def test_a_deploy_after_a_refused_one_uses_only_its_own_overrides(
    monkeypatch: pytest.MonkeyPatch, no_ray: NoRay
) -> None:
    monkeypatch.setenv("MAX_REPLICAS", "1")
    monkeypatch.setenv("MAX_NEW_TOKENS", "256")
    with pytest.raises(ConfigError):
        deploy.deploy({"MAX_REPLICAS": "two"})
    config = deploy.deploy({"MAX_NEW_TOKENS": "32"})  # the learner dropped the bad key
    assert no_ray.ran == [config]
    assert (config.max_replicas, config.max_new_tokens) == (1, 32)
    assert os.environ["MAX_NEW_TOKENS"] == "32"  # a valid override is kept for later cells


# -- ensure_deployed: reuse a working app, replace a broken one ---------------------------------


@pytest.mark.parametrize(
    ("status", "deploys"),
    [
        pytest.param(None, 1, id="not deployed: deploy"),
        pytest.param(ApplicationStatus.RUNNING, 0, id="running: reuse"),
        pytest.param(ApplicationStatus.DEPLOYING, 0, id="deploying: reuse, wait_until_up waits"),
        pytest.param(ApplicationStatus.UNHEALTHY, 0, id="unhealthy: Serve restarts replicas"),
        pytest.param(ApplicationStatus.DEPLOY_FAILED, 1, id="failed: redeploy"),
        pytest.param(ApplicationStatus.DELETING, 1, id="deleting: redeploy"),
    ],
)
def test_ensure_deployed_redeploys_a_failed_or_deleting_app(
    monkeypatch: pytest.MonkeyPatch, status: ApplicationStatus | None, deploys: int
) -> None:
    """A failed or deleting app used to count as deployed: notebooks 04 and 06
    then waited minutes on an app that would never answer."""
    applications = {} if status is None else {APP_NAME: SimpleNamespace(status=status)}
    monkeypatch.setattr(deploy, "connect", lambda: None)
    monkeypatch.setattr(serve, "status", lambda: SimpleNamespace(applications=applications))
    calls: list[None] = []
    monkeypatch.setattr(deploy, "deploy", lambda: calls.append(None))
    deploy.ensure_deployed()
    assert len(calls) == deploys


# -- delete_app: the walkthrough's serve delete, safe to run again -------------------------------


def completed(returncode: int, stdout: str = "", stderr: str = "") -> CompletedProcess[str]:
    return CompletedProcess(["serve", "delete", APP_NAME], returncode, stdout, stderr)


def not_running_message(monkeypatch: pytest.MonkeyPatch) -> str:
    """What the kit's own ``serve delete`` says when there is nothing to
    delete: the text delete_app must recognise, from the command itself."""
    from helpers.serve import cli

    monkeypatch.setattr(cli.ray, "init", lambda **_: None)
    monkeypatch.setattr(cli.serve, "status", lambda: SimpleNamespace(applications={}))
    result = CliRunner().invoke(cli.delete, [APP_NAME])
    assert result.exit_code == 1, result.output
    return result.stderr


def test_delete_app_shows_the_walkthrough_command_and_deletes(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    ran: list[tuple[str, ...]] = []

    def serve_command(*args: str) -> CompletedProcess[str]:
        ran.append(args)
        return completed(0, stdout=f"Deleted application {APP_NAME!r}.\n")

    monkeypatch.setattr(deploy, "serve_command", serve_command)
    assert deploy.delete_app() == f"Deleted application {APP_NAME!r}."
    assert ran == [("delete", APP_NAME)]
    assert capsys.readouterr().out == f"$ serve delete {APP_NAME}\n"


def test_deleting_again_counts_as_deleted(monkeypatch: pytest.MonkeyPatch) -> None:
    """A re-run of notebook 06's delete cell: the app is gone, so nothing failed."""
    said = not_running_message(monkeypatch)
    monkeypatch.setattr(deploy, "serve_command", lambda *_: completed(1, stderr=said))
    assert deploy.delete_app() == said.strip()


def test_a_delete_that_failed_otherwise_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    refused = "ConnectionError: could not find any running Ray instance\n"
    monkeypatch.setattr(deploy, "serve_command", lambda *_: completed(1, stderr=refused))
    with pytest.raises(RuntimeError, match="could not find any running Ray instance"):
        deploy.delete_app()
