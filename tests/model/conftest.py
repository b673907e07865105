import pytest

from helpers.config import EMBEDDED_MODEL_ID, ServeConfig
from helpers.engine.engine import Engine

padded_only = pytest.mark.parametrize("engine", ["padded"], indirect=True)
"""For a test of what the layout cannot change (sampling, the kernels): the
slots layout is held to the padded one by tests of its own."""
slots_only = pytest.mark.parametrize("engine", ["slots"], indirect=True)
"""For a test of the slots layout's own bookkeeping."""


@pytest.fixture(scope="session", params=["padded", "slots"])
def engine(request: pytest.FixtureRequest) -> Engine:
    """The real embedded model, loaded once per batch layout for every engine
    test: the padded cache CPUs use, and the slots GPUs replay as CUDA graphs
    (run eagerly here, so their bookkeeping is checked without a GPU)."""
    return Engine.load(
        EMBEDDED_MODEL_ID,
        ServeConfig.from_env({}).model_cache_dir,
        cpu_threads=2,
        slots=request.param == "slots",
    )
