"""A hub id on the fast path: a family checkpoint downloaded by its hub id from
a fake hub on loopback, then loaded again offline from the cache alone, runs
on the kit's decoder with transformers' greedy text both times."""

from __future__ import annotations

from pathlib import Path

from tests.fake_hub import FakeHub, FakeRepo, run_with_hub
from tests.family_checkpoints import build_checkpoint

HUB_ID = "kit-tests/tiny-qwen2.5"
PROMPT = "The quick brown fox"
LOAD = """
import json, sys
from pathlib import Path
from helpers.engine.engine import Engine, GenerationRequest, Sampling
engine = Engine.load(sys.argv[1], Path(sys.argv[2]), cpu_threads=1, prepack=False)
[completion] = engine.generate([GenerationRequest(sys.argv[3], Sampling(8, 0.0, 1.0))])
print(json.dumps({"text": completion.text, **engine.info.as_dict()}))
"""


def load_by_hub_id(home: Path, endpoint: str, **env: str) -> dict[str, str]:
    """``Engine.load(HUB_ID)`` in a fresh interpreter, with ``home`` as ``HF_HOME``."""
    args = [HUB_ID, str(home / "kit-cache"), PROMPT]
    return run_with_hub(LOAD, args, home, endpoint, 300, **env)


def transformers_greedy_text(directory: Path) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    ids = tokenizer(PROMPT, return_tensors="pt")
    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    new = model.generate(**ids, max_new_tokens=8, do_sample=False)[0, ids.input_ids.shape[1] :]
    return tokenizer.decode(new, skip_special_tokens=True)


def test_a_hub_id_downloads_then_loads_offline_on_the_kit_decoder(tmp_path: Path) -> None:
    checkpoint = build_checkpoint("qwen2", tmp_path / "checkpoint")
    files = {f.name: f.read_bytes() for f in checkpoint.iterdir() if f.is_file()}
    expected = transformers_greedy_text(checkpoint)
    home = tmp_path / "hf-home"
    with FakeHub({HUB_ID: FakeRepo(files)}) as hub:
        downloaded = load_by_hub_id(home, hub.url)
        assert "model.safetensors" in hub.fetched()
        assert "build.json" not in hub.fetched()  # only what serving reads
    assert downloaded["implementation"] == "kit-decoder"
    assert downloaded["architecture"] == "qwen2"
    assert downloaded["text"] == expected

    offline = load_by_hub_id(home, hub.url, HF_HUB_OFFLINE="1")  # the hub has stopped
    assert offline == downloaded
