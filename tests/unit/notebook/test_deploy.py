"""The share of a GPU each replica asks for when the notebooks deploy on a
GPU cluster: what lets notebook 05's burst scale out on Colab's one GPU."""

import os

import pytest

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
