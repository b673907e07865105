"""The fake ingress the notebook helpers' tests talk to, as fixtures."""

from collections.abc import Iterator

import pytest

from tests.unit.notebook import fake_ingress
from tests.unit.notebook.fake_ingress import PROXY_VARIABLES, FakeServer


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeServer]:
    """The fake ingress; proxy variables are cleared so requests reach it directly."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    with fake_ingress.fake_ingress() as state:
        yield state


@pytest.fixture
def closed_port_url() -> str:
    return fake_ingress.closed_port_url()
