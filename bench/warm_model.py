"""The embedded model as a warm replica holds it, for benches that build
engines of their own around it, and prompts of a given length in tokens."""

from __future__ import annotations

import itertools

from helpers.config import EMBEDDED_MODEL_ID, ServeConfig
from helpers.engine.engine import Engine, GenerationRequest, Sampling

SENTENCE = "Ray Serve scales replicas up and down with the traffic they get. "


def warm_model(threads: int) -> Engine:
    """The embedded model loaded and prepacked, as a replica is once warm
    (prepacking starts after a first request); its engine closed, so that
    ``Engine(loaded.model, loaded.tokenizer, ...)`` builds the ways compared."""
    loaded = Engine.load(
        EMBEDDED_MODEL_ID, ServeConfig.from_env().model_cache_dir, cpu_threads=threads
    )
    loaded.generate([GenerationRequest("Hi", Sampling(4, 0.0, 1.0))])
    assert loaded.tuned is not None
    loaded.tuned.result()
    loaded.close()
    return loaded


def prompt_of(loaded: Engine, tokens: int, label: str = "") -> tuple[int, ...]:
    """Token ids of ``label`` then ``SENTENCE`` repeated, cut to ``tokens``.
    Distinct labels make distinct prompts (of more tokens than the label),
    which the engine cannot share one prefill between."""
    sentence = loaded.tokenizer(SENTENCE)["input_ids"]
    ids = itertools.chain(loaded.tokenizer(label)["input_ids"], itertools.cycle(sentence))
    return tuple(itertools.islice(ids, tokens))
