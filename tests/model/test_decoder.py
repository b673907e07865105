"""The batcher's contract with its models (helpers/engine/decoder.py): the
kit's Llama and a transformers model behind it decode the same text."""

from pathlib import Path

import pytest

from helpers.config import ServeConfig
from helpers.engine.decoder import Decoder, SegmentDecoder, SlotDecoder, TransformersDecoder
from helpers.engine.embedded_model import ensure_converted
from helpers.engine.engine import Engine, GenerationRequest, Sampling
from helpers.engine.llama_config import llama_config
from helpers.engine.llama_loading import load_llama
from helpers.engine.tokenizer import Tokenizer

PROMPTS = ["The capital of France is", "Write a haiku about Ray Serve."]


@pytest.fixture(scope="module")
def converted() -> Path:
    return ensure_converted(ServeConfig.from_env({}).model_cache_dir)


def greedy_texts(model: Decoder, converted: Path) -> list[str]:
    tokenizer = Tokenizer.from_directory(converted)
    engine = Engine(model, tokenizer, model_id="test", max_batch_size=4)
    requests = [GenerationRequest(prompt, Sampling(12, 0.0, 1.0)) for prompt in PROMPTS]
    return [completion.text for completion in engine.generate(requests)]


def test_a_transformers_model_behind_the_contract_decodes_as_the_kits_llama(
    converted: Path,
) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    theirs = TransformersDecoder(AutoModelForCausalLM.from_pretrained(converted))
    ours = load_llama(converted, llama_config(converted), torch.float32, "cpu", gguf_blocks=False)
    assert greedy_texts(theirs, converted) == greedy_texts(ours, converted)


def test_the_faster_abilities_are_asked_for_by_type(converted: Path) -> None:
    import torch

    ours = load_llama(converted, llama_config(converted), torch.float32, "cpu", gguf_blocks=False)
    assert isinstance(ours, SegmentDecoder) and isinstance(ours, SlotDecoder)
    with pytest.raises(ValueError, match="SlotDecoder"):
        Engine(
            TransformersDecoder(_tiny_transformers_llama()),
            Tokenizer.from_directory(converted),
            model_id="test",
            slots=True,
        )


def _tiny_transformers_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    model = LlamaForCausalLM(config)
    assert not isinstance(TransformersDecoder(model), SegmentDecoder | SlotDecoder)
    return model
