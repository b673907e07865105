"""Each architecture the kit's decoder runs, served by the app as ``make
serve`` builds it, with ``MODEL_ID`` pointing at a tiny checkpoint built here:
the greedy text is transformers' own ``generate``, and ``/healthz`` and
``/v1/models`` name the kit's decoder.

One checkpoint per ``model_type`` with its distinctive switch (Llama 3's
RoPE scaling, Mistral's sliding window, Qwen2's biases, Qwen3's norms); the
embedded SmolLM2 is served by every other integration test. Every variant in
``tests/family_checkpoints.py`` goes through the engine in
``tests/model/test_families.py``, which costs seconds where a deployment
costs ten or more."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from ray import serve

from helpers.config import APP_NAME, ServeConfig
from helpers.notebook.polling import wait_for
from helpers.serve.app import build_app
from tests.family_checkpoints import FAMILIES, build_checkpoint
from tests.integration.conftest import BASE_URL

PROMPT = "Ray Serve runs the application on a cluster, and the replicas scaled to zero."
"""Longer than the sliding window of ``mistral-window``."""
MAX_TOKENS = 10


def transformers_greedy_text(directory: Path) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    ids = tokenizer(PROMPT, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=MAX_TOKENS, do_sample=False)
    return tokenizer.decode(out[0, ids.input_ids.shape[1] :], skip_special_tokens=True)


@pytest.fixture(scope="module")
def served(ray_cluster: None) -> Iterator[None]:
    yield
    if APP_NAME in serve.status().applications:
        serve.delete(APP_NAME)


SERVED = ["llama3", "mistral-window", "qwen2", "qwen3"]


@pytest.mark.parametrize("family", SERVED)
def test_the_app_serves_each_family_on_the_kit_decoder(
    family: str, served: None, tmp_path_factory: pytest.TempPathFactory
) -> None:
    directory = build_checkpoint(family, tmp_path_factory.mktemp(family))
    config = ServeConfig.from_env(
        {**os.environ, "MODEL_ID": str(directory), "MIN_REPLICAS": "1", "MAX_REPLICAS": "1"}
    )
    serve.run(build_app(config), name=APP_NAME, route_prefix="/")
    body = {"model": str(directory), "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0}
    reply = requests.post(f"{BASE_URL}/v1/completions", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["text"] == transformers_greedy_text(directory)

    def healthz() -> dict:
        return requests.get(f"{BASE_URL}/healthz", timeout=10).json()

    wait_for(lambda: healthz()["engine"] is not None, 30, "/healthz to name the engine")
    engine = healthz()["engine"]
    assert engine["implementation"] == "kit-decoder"
    assert engine["architecture"] == FAMILIES[family].model_type
    assert (engine["dtype"], engine["device"]) == ("float32", "cpu")
    card = requests.get(f"{BASE_URL}/v1/models", timeout=10).json()["data"][0]
    assert card["id"] == str(directory) and card["engine"] == engine
