"""``DTYPE`` and the device: what ``auto`` picks on each kind of machine."""

from __future__ import annotations

import pytest
import torch

from helpers.engine.engine import pick_device


@pytest.fixture
def gpu(monkeypatch: pytest.MonkeyPatch):
    """A GPU of the compute capability the test sets, as torch would report it."""

    def present(capability: tuple[int, int]) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *_: capability)

    return present


@pytest.mark.parametrize(
    ("capability", "dtype"),
    [
        pytest.param((7, 5), torch.float16, id="T4-float16"),
        pytest.param((8, 0), torch.bfloat16, id="A100-bfloat16"),
        pytest.param((9, 0), torch.bfloat16, id="H100-bfloat16"),
    ],
)
def test_auto_is_bfloat16_only_where_the_gpu_computes_it(gpu, capability, dtype) -> None:
    gpu(capability)
    assert pick_device(want_gpu=True) == ("cuda", dtype)


def test_auto_is_float32_on_cpu_even_with_a_gpu_present(gpu) -> None:
    gpu((9, 0))
    assert pick_device(want_gpu=False) == ("cpu", torch.float32)


@pytest.mark.parametrize("name", ["float32", "bfloat16", "float16"])
def test_a_named_dtype_is_taken_as_named(gpu, name: str) -> None:
    gpu((7, 5))
    assert pick_device(want_gpu=True, dtype=name) == ("cuda", getattr(torch, name))
    assert pick_device(want_gpu=False, dtype=name) == ("cpu", getattr(torch, name))


@pytest.mark.parametrize(("capability", "warned"), [((7, 5), True), ((8, 0), False)])
def test_bfloat16_asked_for_where_the_gpu_only_emulates_it_is_warned_of(
    gpu, caplog: pytest.LogCaptureFixture, capability: tuple[int, int], warned: bool
) -> None:
    """A T4 takes bfloat16 but computes it slowly: the replica's log says so."""
    gpu(capability)
    with caplog.at_level("WARNING"):
        assert pick_device(want_gpu=True, dtype="bfloat16") == ("cuda", torch.bfloat16)
    assert ("emulated" in caplog.text) == warned
    assert ("capability 7.5" in caplog.text) == warned
