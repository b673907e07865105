"""The kit's own Llama and tokenizer (helpers/engine/llama.py, helpers/engine/tokenizer.py)
against transformers', on the real embedded model.

They exist to keep transformers out of a replica's start; these tests hold
them to giving what transformers gives.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers.config import ServeConfig
from helpers.engine.decoder import Segment, TransformersDecoder
from helpers.engine.embedded_model import ensure_converted
from helpers.engine.kv_cache import KVCache
from helpers.engine.llama import Llama
from helpers.engine.llama_config import UnsupportedCheckpoint, llama_config
from helpers.engine.llama_loading import load_llama
from helpers.engine.tokenizer import Tokenizer

TEXTS = [
    "The capital of France is",
    "  leading spaces, ünïcödé ✓ and 🚀",
    "<|im_start|>user\nHi<|im_end|>\n",
    "a\n\nb\tc",
]
CONVERSATIONS = [
    [{"role": "user", "content": "Write a haiku about Ray Serve."}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Name a colour."},
    ],
]


@pytest.fixture(scope="module")
def converted() -> Path:
    return ensure_converted(ServeConfig.from_env({}).model_cache_dir)


@pytest.fixture(scope="module")
def tokenizers(converted: Path) -> tuple[Tokenizer, object]:
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(converted)
    theirs.padding_side = "left"
    ours = Tokenizer.from_directory(converted)
    assert ours is not None
    return ours, theirs


def test_the_tokenizer_gives_transformers_ids_and_text(tokenizers) -> None:
    ours, theirs = tokenizers
    for text in TEXTS:
        for special in (True, False):
            ids = ours(text, add_special_tokens=special)["input_ids"]
            assert ids == theirs(text, add_special_tokens=special)["input_ids"]
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(
                    ids, skip_special_tokens=skip
                )
    for key in ("input_ids", "attention_mask"):  # one text as tensors: a batch of one
        assert torch.equal(
            ours(TEXTS[0], return_tensors="pt")[key], theirs(TEXTS[0], return_tensors="pt")[key]
        )
    mine = ours(TEXTS, return_tensors="pt", padding=True)
    reference = theirs(TEXTS, return_tensors="pt", padding=True)
    for key in ("input_ids", "attention_mask"):
        assert torch.equal(mine[key], reference[key])
    assert (ours.eos_token_id, ours.pad_token_id) == (theirs.eos_token_id, theirs.pad_token_id)


def test_the_tokenizer_renders_chats_as_transformers_does(tokenizers) -> None:
    ours, theirs = tokenizers
    for messages in CONVERSATIONS:
        for generation_prompt in (True, False):
            assert ours.apply_chat_template(
                messages, add_generation_prompt=generation_prompt
            ) == theirs.apply_chat_template(
                messages, add_generation_prompt=generation_prompt, tokenize=False
            )


def test_the_model_gives_transformers_logits_through_prefill_and_decode(
    converted: Path, tokenizers
) -> None:
    """A left-padded batch, as the batcher feeds it: prefill, then decode steps."""
    from transformers import AutoModelForCausalLM

    config = llama_config(converted)
    assert config is not None
    ours = load_llama(converted, config, torch.float32, "cpu")
    theirs = TransformersDecoder(
        AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()
    )
    batch = tokenizers[0](TEXTS, return_tensors="pt", padding=True)
    mask = batch["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    caches = (ours.new_cache(), theirs.new_cache())
    with torch.inference_mode():
        logits = [
            model(
                input_ids=batch["input_ids"],
                attention_mask=mask,
                position_ids=positions,
                cache=cache,
                logits_to_keep=1,
            ).logits[:, -1]
            for model, cache in zip((ours, theirs), caches, strict=True)
        ]
        positions = positions[:, -1:]
        for _ in range(6):
            assert torch.allclose(logits[0], logits[1], atol=1e-3), (
                (logits[0] - logits[1]).abs().max()
            )
            tokens = logits[1].argmax(-1)[:, None]
            assert torch.equal(logits[0].argmax(-1), logits[1].argmax(-1))
            mask, positions = F.pad(mask, (0, 1), value=1), positions + 1
            logits = [
                model(
                    input_ids=tokens,
                    attention_mask=mask,
                    position_ids=positions,
                    cache=cache,
                ).logits[:, -1]
                for model, cache in zip((ours, theirs), caches, strict=True)
            ]


def test_a_pass_of_two_segments_gives_the_logits_of_two_passes(converted: Path, tokenizers) -> None:
    """A decode step and a prefill in one pass (the batcher folds new prompts
    into the running batch's step) give what they give in passes of their
    own, and leave each cache as its own pass would."""
    config = llama_config(converted)
    assert config is not None
    model = load_llama(converted, config, torch.float32, "cpu")

    def encoded(texts: list[str]) -> tuple[torch.Tensor, ...]:
        batch = tokenizers[0](texts, return_tensors="pt", padding=True)
        mask = batch["attention_mask"]
        return batch["input_ids"], mask, (mask.cumsum(-1) - 1).clamp(min=0)

    def segments() -> tuple[Segment, Segment]:
        ids, mask, positions = encoded(TEXTS[:2])
        running = model.new_cache()
        tokens = (
            model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=running)
            .logits[:, -1]
            .argmax(-1)[:, None]
        )
        step = Segment(tokens, running, positions[:, -1:] + 1, F.pad(mask, (0, 1), value=1))
        ids, mask, positions = encoded(TEXTS[2:])
        return step, Segment(ids, model.new_cache(), positions, mask, logits_to_keep=1)

    with torch.inference_mode():
        apart = [model.forward_segments([segment])[0] for segment in segments()]
        together_segments = segments()
        together = model.forward_segments(list(together_segments))
        for alone, joint in zip(apart, together, strict=True):
            assert alone.shape == joint.shape
            assert torch.allclose(alone, joint, atol=1e-4), (alone - joint).abs().max()
            assert torch.equal(alone.argmax(-1), joint.argmax(-1))
        step, prefill = together_segments
        assert step.cache.length == step.attention_mask.shape[1]
        assert prefill.cache.length == prefill.input_ids.shape[1]


def test_an_unpadded_step_attends_without_a_mask_to_the_same_bit(
    converted: Path, tokenizers, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One new token per row and no padding: the cache gives no mask, and the
    logits are those of the same step with its all-true mask applied."""
    config = llama_config(converted)
    assert config is not None
    model = load_llama(converted, config, torch.float32, "cpu")
    ids = tokenizers[0](TEXTS[:1], return_tensors="pt")["input_ids"]

    def step_logits() -> torch.Tensor:
        cache = model.new_cache()
        token = model(input_ids=ids, cache=cache).logits[:, -1].argmax(-1)[:, None]
        return model(input_ids=token, cache=cache).logits

    with torch.inference_mode():
        cache = model.new_cache()
        model(input_ids=ids, cache=cache)
        assert cache.mask(None, torch.tensor([[ids.shape[1]]]), 1, None) is None
        assert cache.mask(None, torch.tensor([[ids.shape[1]]]), 1, ids.shape[1]) is not None
        unmasked = step_logits()
        build_mask = KVCache.mask

        def always_a_mask(cache: KVCache, *args: object) -> torch.Tensor:
            mask = build_mask(cache, *args)  # type: ignore[arg-type]
            return torch.ones(1, 1, 1, cache.length + 1, dtype=torch.bool) if mask is None else mask

        monkeypatch.setattr(KVCache, "mask", always_a_mask)
        masked = step_logits()
    assert torch.equal(unmasked, masked)


def write_checkpoint(directory: Path, config: dict, tokenizer_class: str) -> Path:
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "model.safetensors").write_bytes(b"")
    (directory / "tokenizer.json").write_text("{}")
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": tokenizer_class})
    )
    return directory


def test_other_checkpoints_are_left_to_transformers_with_the_reason(
    converted: Path, tmp_path: Path
) -> None:
    llama = json.loads((converted / "config.json").read_text())
    qwen_sliding = {
        **llama,
        "model_type": "qwen2",
        "use_sliding_window": True,
        "max_window_layers": 1,
    }
    refused = {
        "gpt2": ({**llama, "model_type": "gpt2"}, "model_type 'gpt2'"),
        "yarn": ({**llama, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "'yarn'"),
        "gelu": ({**llama, "hidden_act": "gelu"}, "hidden_act 'gelu'"),
        "quantized": ({**llama, "quantization_config": {"bits": 4}}, "quantized"),
        "qwen-sliding": (qwen_sliding, "sliding window"),
    }
    for name, (config, reason) in refused.items():
        with pytest.raises(UnsupportedCheckpoint, match=reason):
            llama_config(write_checkpoint(tmp_path / name, config, "GPT2TokenizerFast"))
    with pytest.raises(UnsupportedCheckpoint, match=r"config\.json"):
        llama_config(tmp_path)  # no config.json at all
    mistral = llama_config(
        write_checkpoint(tmp_path / "mistral", {**llama, "model_type": "mistral"}, "X")
    )
    assert mistral.sliding_window == 4096  # transformers' default when the key is absent


def test_the_embedded_model_serves_without_importing_transformers() -> None:
    """The point of both modules: a replica's start never imports it."""
    code = (
        "import sys; from helpers.engine.engine import Engine, GenerationRequest as R, "
        "Sampling as S; "
        "from helpers.config import EMBEDDED_MODEL_ID, ServeConfig; "
        "e = Engine.load(EMBEDDED_MODEL_ID, ServeConfig.from_env({}).model_cache_dir, "
        "cpu_threads=1); print(type(e.model).__name__, len(e.generate([R('Hi', S(3, 0.0, 1.0))])), "
        "'transformers' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    assert result.stdout.split() == [Llama.__name__, "1", "False"], result.stderr[-2000:]
