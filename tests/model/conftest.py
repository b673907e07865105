import pytest

from helpers.config import EMBEDDED_MODEL_ID, ServeConfig
from helpers.engine import Engine


@pytest.fixture(scope="session")
def engine() -> Engine:
    """The real embedded model, loaded once for every engine test."""
    return Engine.load(EMBEDDED_MODEL_ID, ServeConfig.from_env({}).model_cache_dir, cpu_threads=2)
