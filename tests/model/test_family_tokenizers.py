"""The kit's tokenizer (helpers/engine/tokenizer.py) against transformers'
``AutoTokenizer`` on a tiny checkpoint of every family (tests/family_checkpoints.py):
the same ids, text, special-token ids and chat prompts, where transformers 5
uses tokenizer.json as it is and where the tokenizer class rebuilds it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from helpers.engine.tokenizer import Tokenizer
from tests.family_checkpoints import FAMILIES, build_checkpoint

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    " leading space, then  two   spaces\tand a tab\n\nand new lines\r\n",
    "Digits: 1234567 and 3.14159, 08:30, 2024-01-02.",
    "Unicode: café naïve über 日本語 😀 ﬁ Å (NFC: A\u030a).",
    "unknown characters \u2603\u26a1 and a lone \u00a0 no-break space",
    "special tokens inside text: <s> </s> <|im_start|>user<|im_end|> "
    "<|begin_of_text|><|eot_id|> <|endoftext|> <think>a</think>",
    "",
    "   ",
    "What's it? I'm sure they're done, we've won, you'll see , ok .",
]
CHATS = [
    [{"role": "user", "content": "Hello there!"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Count to 3."},
    ],
    [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! 12 apples."},
        {"role": "user", "content": "And then?"},
    ],
    [
        {"role": "user", "content": "Think first"},
        {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nDone."},
        {"role": "user", "content": "Again"},
    ],
]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("families")


def pair(directory: Path) -> tuple[Tokenizer, object]:
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(directory)
    theirs.padding_side = "left"
    if theirs.pad_token_id is None:  # what the engine does with transformers' tokenizer
        theirs.pad_token = theirs.eos_token
    ours = Tokenizer.from_directory(directory)
    assert ours is not None, f"{directory.name}: the kit's tokenizer refused it"
    return ours, theirs


def assert_same(ours: Tokenizer, theirs, name: str) -> None:
    for text in TEXTS:
        for special in (True, False):
            ids = ours(text, add_special_tokens=special)["input_ids"]
            assert ids == theirs(text, add_special_tokens=special)["input_ids"], (name, text)
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(
                    ids, skip_special_tokens=skip
                ), (name, text, skip)
    mine = ours(TEXTS, return_tensors="pt", padding=True)
    reference = theirs(TEXTS, return_tensors="pt", padding=True)
    for key in ("input_ids", "attention_mask"):
        assert mine[key].tolist() == reference[key].tolist(), (name, key)
    assert (ours.eos_token_id, ours.pad_token_id) == (theirs.eos_token_id, theirs.pad_token_id)
    assert ours.eos_token == theirs.eos_token


def assert_same_chats(ours: Tokenizer, theirs, name: str) -> None:
    for messages in CHATS:
        for prompt in (True, False):
            for extra in ({}, {"enable_thinking": False}):
                try:
                    expected = theirs.apply_chat_template(
                        messages, add_generation_prompt=prompt, tokenize=False, **extra
                    )
                except Exception as err:  # a template that refuses the conversation
                    with pytest.raises(type(err)):
                        ours.apply_chat_template(messages, add_generation_prompt=prompt, **extra)
                    continue
                got = ours.apply_chat_template(messages, add_generation_prompt=prompt, **extra)
                assert got == expected, (name, messages, prompt, extra)
                ids = ours(got, add_special_tokens=False)["input_ids"]
                assert ids == theirs(expected, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_kit_tokenizes_every_family_as_transformers_does(checkpoints: Path, family) -> None:
    ours, theirs = pair(build_checkpoint(family, checkpoints / family))
    assert_same(ours, theirs, family)
    assert_same_chats(ours, theirs, family)


def with_config(source: Path, target: Path, change) -> Path:
    shutil.copytree(source, target)
    path = target / "tokenizer_config.json"
    config = json.loads(path.read_text())
    change(config, target)
    path.write_text(json.dumps(config))
    return target


def hub_v4(config: dict, directory: Path) -> None:
    """As transformers 4 saved it: the template inside tokenizer_config.json."""
    config["chat_template"] = (directory / "chat_template.jinja").read_text()
    (directory / "chat_template.jinja").unlink()


VARIANTS = {
    "template-in-config": ("qwen2", hub_v4),
    "llama-adds-eos": ("llama2", lambda c, d: c.update(add_eos_token=True)),
    "llama-no-bos": ("llama2", lambda c, d: c.update(add_bos_token=False)),
    "llama-legacy": ("llama2", lambda c, d: c.update(legacy=True)),
    "llama-no-prefix-space": ("llama2", lambda c, d: c.update(add_prefix_space=False)),
    "mistral-adds-eos": ("mistral", lambda c, d: c.update(add_eos_token=True)),
    "llama3-as-llama-tokenizer": (
        "llama3",
        lambda c, d: c.update(tokenizer_class="LlamaTokenizerFast", add_bos_token=True),
    ),
    "qwen2-generic-class": (
        "qwen2",
        lambda c, d: c.update(tokenizer_class="PreTrainedTokenizerFast"),
    ),
    "qwen3-generic-class": ("qwen3", lambda c, d: c.update(tokenizer_class="TokenizersBackend")),
    "qwen-default-specials": ("qwen3", lambda c, d: [c.pop(k) for k in ("eos_token", "pad_token")]),
    "smollm2-fast-class": (
        "smollm2-135m",
        lambda c, d: c.update(tokenizer_class="GPT2TokenizerFast"),
    ),
    "smollm2-prefix-space": ("smollm2-360m", lambda c, d: c.update(add_prefix_space=True)),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_hub_variants_of_the_settings_tokenize_as_transformers_does(
    checkpoints: Path, tmp_path: Path, variant
) -> None:
    family, change = VARIANTS[variant]
    directory = with_config(
        build_checkpoint(family, checkpoints / family), tmp_path / variant, change
    )
    ours, theirs = pair(directory)
    assert_same(ours, theirs, variant)
    assert_same_chats(ours, theirs, variant)


def test_the_rebuild_differs_from_the_file_where_transformers_rebuilds(checkpoints: Path) -> None:
    """Llama 2's tokenizer.json prepends "▁" to every piece between special
    tokens (its legacy normalizer); LlamaTokenizer in transformers 5 rebuilds
    a Metaspace that prepends it to the first only, and so does the kit. A
    check that the family test exercises the rebuild at all."""
    from tokenizers import Tokenizer as Backend

    directory = build_checkpoint("llama2", checkpoints / "llama2")
    verbatim = Backend.from_file(str(directory / "tokenizer.json"))
    ours = Tokenizer.from_directory(directory)
    text = "hello</s>world"
    assert ours(text)["input_ids"] != verbatim.encode(text).ids


@pytest.mark.parametrize(
    "family, change",
    [
        ("qwen2", {"auto_map": {"AutoTokenizer": ["x.Tok", None]}}),
        ("qwen2", {"split_special_tokens": True}),
        ("llama2", {"tokenizer_class": "CodeLlamaTokenizer"}),
        ("qwen3", {"tokenizer_class": "BertTokenizer"}),
    ],
)
def test_what_the_kit_cannot_follow_is_left_to_transformers(
    checkpoints: Path, tmp_path: Path, family, change
) -> None:
    directory = with_config(
        build_checkpoint(family, checkpoints / family),
        tmp_path / "x",
        lambda c, d: c.update(change),
    )
    assert Tokenizer.from_directory(directory) is None


def test_an_unknown_model_type_with_a_specific_class_is_left_to_transformers(
    checkpoints: Path, tmp_path: Path
) -> None:
    directory = tmp_path / "gemma"
    shutil.copytree(build_checkpoint("llama2", checkpoints / "llama2"), directory)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "model_type": "gemma"}))
    assert Tokenizer.from_directory(directory) is None
