"""Tiny checkpoints of every model family the kit's decoder runs, built here.

Nothing is downloaded: each family's tokenizer is trained on the fixed text
below with the ``tokenizers`` trainers, handed to the family's own
transformers tokenizer class and saved by it, then touched up where real hub
repositories differ from what transformers 5 writes (``tokenizer_class``,
SmolLM2's digit-splitting pre-tokenizer, Llama 2's legacy SentencePiece
normalizer, configs in the older ``rope_scaling`` form); the weights are
transformers' own model class at random, from a fixed seed.

    from tests.family_checkpoints import FAMILIES, build_checkpoint
    directory = build_checkpoint("llama3", tmp_path / "llama3", seed=0)

Every checkpoint is tiny (hidden size at most 64, two layers, a vocabulary of
a few hundred), so all of them build in seconds on a CPU. ``initializer_range``
is large, so logits are far from flat and greedy tokens change from step to
step. ``build_checkpoint`` leaves a directory alone that already holds a
complete build of the same family and seed (``build.json`` records both).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TEXT = """\
The quick brown fox jumps over the lazy dog. A model reads the prompt, one token
at a time, and writes the answer back: tokens, words and sentences. In 2024 the
server answered 1234 requests in 56.7 seconds; the replicas scaled to zero at
08:30 and woke up again at 09:15. Ray Serve runs the application on a cluster.
"Hello, world!" said the notebook.  Tabs\tand    spaces, new lines
and more new lines. Caf\u00e9, na\u00efve, \u00fcber, \u65e5\u672c\u8a9e,
\U0001f600 and \u00e9t\u00e9.
You are a helpful assistant. What is the capital of France? Paris is the capital.
Scale down, scale up, batch the requests, stream the text, stop at the end.
"""

INIT_STD = 0.2

# Chat templates: short, but shaped like the real ones.
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}"
    "{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)

MISTRAL_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] %}{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}"
    "{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('After the optional system message, conversation roles must alternate "
    "user/assistant/user/assistant/...') }}{%- endif %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.first and system_message is defined %}"
    "{{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}"
    "{%- else %}{{- ' [INST] ' + message['content'] + ' [/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token }}"
    "{%- else %}{{- raise_exception('Only user and assistant roles are supported, "
    "with the exception of an initial optional system message!') }}{%- endif %}"
    "{%- endfor %}"
)

LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if not date_string is defined %}{%- if strftime_now is defined %}"
    '{%- set date_string = strftime_now("%d %b %Y") %}'
    '{%- else %}{%- set date_string = "26 Jul 2024" %}{%- endif %}{%- endif %}'
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content']|trim %}{%- set messages = messages[1:] %}"
    '{%- else %}{%- set system_message = "" %}{%- endif %}'
    '{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}'
    '{{- "Cutting Knowledge Date: December 2023\\n" }}'
    '{{- "Today Date: " + date_string + "\\n\\n" }}'
    '{{- system_message }}{{- "<|eot_id|>" }}'
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' "
    "+ message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

QWEN2_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. "
    "You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}\n"
)

QWEN3_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.content is string %}{%- set content = message.content %}"
    "{%- else %}{%- set content = '' %}{%- endif %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{%- if '</think>' in content %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}"
    "{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}"
)

SMOLLM2_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, "
    "trained by Hugging Face<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class Family:
    """One variant: the config transformers builds the model from, and the
    tokenizer kind, class and special tokens its hub repositories have."""

    model_type: str
    config: dict[str, Any]
    tokenizer: str  # "sentencepiece", "llama3", "qwen", "smollm2"
    chat_template: str
    about: str
    hub_rope: bool = False  # config.json in the hub's older form: rope_theta, rope_scaling
    extra: dict[str, Any] = field(default_factory=dict)


def _llama(**overrides: Any) -> dict[str, Any]:
    config = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
    }
    return config | overrides


FAMILIES: dict[str, Family] = {
    "llama2": Family(
        "llama",
        _llama(),
        "sentencepiece",
        LLAMA2_TEMPLATE,
        "Llama 1/2, TinyLlama: multi-head attention, default RoPE, untied embeddings; "
        "LlamaTokenizer (SentencePiece BPE with byte fallback, legacy normalizer in "
        "tokenizer.json, add_bos_token), [INST] <<SYS>> template",
    ),
    "llama2-linear-rope": Family(
        "llama",
        _llama(num_key_value_heads=2, rope_scaling={"type": "linear", "factor": 2.0}),
        "sentencepiece",
        LLAMA2_TEMPLATE,
        "Llama 2 with linear RoPE scaling (factor 2, written with the older key 'type') "
        "and grouped-query attention",
        hub_rope=True,
    ),
    "llama3": Family(
        "llama",
        _llama(
            num_key_value_heads=2,
            rope_theta=500000.0,
            max_position_embeddings=131072,
            tie_word_embeddings=True,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 32.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
        ),
        "llama3",
        LLAMA3_TEMPLATE,
        "Llama 3.x (3.2-1B): llama3 RoPE scaling with head_dim 16 and theta 5e5, where "
        "frequencies 0-3 are kept, 4 is smoothed and 5-7 are divided by 32; tied embeddings; "
        "PreTrainedTokenizerFast byte-level with a BOS post-processor, <|eot_id|> among "
        "three eos ids; Llama 3 header template with strftime_now",
        hub_rope=True,
    ),
    "mistral": Family(
        "mistral",
        _llama(num_key_value_heads=2, rope_theta=1000000.0, sliding_window=None),
        "sentencepiece",
        MISTRAL_TEMPLATE,
        "Mistral 7B v0.2+: no sliding window, GQA, theta 1e6; LlamaTokenizer-class "
        "tokenizer (model_type mistral: transformers 5 uses tokenizer.json as is); [INST] template",
    ),
    "mistral-window": Family(
        "mistral",
        _llama(num_key_value_heads=2, sliding_window=8),
        "sentencepiece",
        MISTRAL_TEMPLATE,
        "Mistral 7B v0.1: sliding window of 8 tokens, so longer prompts exercise it",
    ),
    "qwen2": Family(
        "qwen2",
        _llama(
            num_key_value_heads=2,
            rope_theta=1000000.0,
            tie_word_embeddings=True,
            use_sliding_window=False,
            max_window_layers=2,
        ),
        "qwen",
        QWEN2_TEMPLATE,
        "Qwen2/2.5: q/k/v bias, tied embeddings, theta 1e6; Qwen2Tokenizer (no BOS, eos "
        "<|im_end|>, pad <|endoftext|>), ChatML with Qwen2.5's default system prompt",
    ),
    "qwen3": Family(
        "qwen3",
        _llama(num_key_value_heads=2, head_dim=32, rope_theta=1000000.0, tie_word_embeddings=True),
        "qwen",
        QWEN3_TEMPLATE,
        "Qwen3: q/k RMSNorm, head_dim 32 > hidden/heads 16, tied; Qwen2Tokenizer with "
        "non-special <think> tokens, template taking enable_thinking",
        extra={"think": True},
    ),
    "smollm2-135m": Family(
        "llama",
        _llama(
            hidden_size=48,
            num_attention_heads=3,
            num_key_value_heads=1,
            rope_theta=100000.0,
            tie_word_embeddings=True,
            max_position_embeddings=8192,
        ),
        "smollm2",
        SMOLLM2_TEMPLATE,
        "SmolLM2-135M shape: 3:1 query to key-value heads (9/3), tied, theta 1e5; "
        "GPT2Tokenizer with a Digits pre-tokenizer in tokenizer.json, ChatML",
    ),
    "smollm2-360m": Family(
        "llama",
        _llama(
            hidden_size=60,
            num_attention_heads=15,
            num_key_value_heads=5,
            rope_theta=100000.0,
            tie_word_embeddings=True,
            max_position_embeddings=8192,
        ),
        "smollm2",
        SMOLLM2_TEMPLATE,
        "SmolLM2-360M shape: 15 query heads over 5 key-value heads (head_dim 4), tied, theta 1e5",
    ),
    "smollm2-1.7b": Family(
        "llama",
        _llama(rope_theta=130000.0, tie_word_embeddings=True, max_position_embeddings=8192),
        "smollm2",
        SMOLLM2_TEMPLATE,
        "SmolLM2-1.7B shape: multi-head attention (32/32), tied, theta 1.3e5",
    ),
}

BUILD_VERSION = 2


def build_checkpoint(family: str, directory: Path, *, seed: int = 0) -> Path:
    """Write a tiny checkpoint of ``family`` into ``directory`` and return it:
    config.json, generation_config.json, model.safetensors and the tokenizer
    files, as a hub repository of that family holds them. A directory that
    already holds a complete build of the same family and seed is reused."""
    spec = FAMILIES[family]
    directory = Path(directory)
    stamp = {"family": family, "seed": seed, "version": BUILD_VERSION}
    marker = directory / "build.json"
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        return directory
    if marker.exists():
        marker.unlink()
    directory.mkdir(parents=True, exist_ok=True)

    tokenizer = _TOKENIZERS[spec.tokenizer](spec, directory)
    _save_model(spec, tokenizer, directory, seed)
    marker.write_text(json.dumps(stamp))
    return directory


# ---------------------------------------------------------------- tokenizers


def _train_bpe(pre_tokenizer: Any, normalizer: Any, vocab_size: int, alphabet: list[str]) -> Any:
    from tokenizers import Tokenizer, models, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=alphabet, show_progress=False, min_frequency=2
    )
    tokenizer.train_from_iterator(TEXT.splitlines(keepends=True), trainer)
    state = json.loads(tokenizer.to_str())["model"]
    return state["vocab"], [
        tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]
    ]


def _patch(directory: Path, name: str, change: Callable[[dict[str, Any]], None]) -> None:
    path = directory / name
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _sentencepiece(spec: Family, directory: Path) -> Any:
    """Llama 2 / TinyLlama / Mistral: BPE over SentencePiece pieces with byte
    fallback, <unk> <s> </s> at 0-2, then the 256 byte pieces."""
    from tokenizers import normalizers
    from transformers import LlamaTokenizer

    vocab, merges = _train_bpe(
        None,
        normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]),
        300,
        [],
    )
    full = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for byte in range(256):
        full[f"<0x{byte:02X}>"] = len(full)
    for token in sorted(vocab, key=vocab.get):
        full.setdefault(token, len(full))
    tokenizer = LlamaTokenizer(vocab=full, merges=merges, legacy=False, add_bos_token=True)
    tokenizer.chat_template = spec.chat_template
    tokenizer.save_pretrained(directory)

    def hub_file(data: dict[str, Any]) -> None:
        # What the hub's Llama 2 / Mistral files hold (converted by transformers 4):
        # a normalizer that prepends and replaces spaces, no pre-tokenizer.
        data["normalizer"] = {
            "type": "Sequence",
            "normalizers": [
                {"type": "Prepend", "prepend": "▁"},
                {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
            ],
        }
        data["pre_tokenizer"] = None
        data["decoder"] = {
            "type": "Sequence",
            "decoders": [
                {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0},
            ],
        }

    def hub_config(data: dict[str, Any]) -> None:
        data["tokenizer_class"] = "LlamaTokenizer"
        data["add_bos_token"] = True
        data["add_eos_token"] = False
        data["legacy"] = False
        data["pad_token"] = None
        data["padding_side"] = "left" if spec.model_type == "mistral" else "right"

    _patch(directory, "tokenizer.json", hub_file)
    _patch(directory, "tokenizer_config.json", hub_config)
    return tokenizer


LLAMA3_SPECIAL = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
]


def _byte_level_vocab(pattern: str | None, digits: bool, size: int) -> tuple[dict, list]:
    from tokenizers import Regex, pre_tokenizers

    steps = []
    if digits:
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    if pattern:
        steps.append(pre_tokenizers.Split(Regex(pattern), behavior="isolated"))
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    else:
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False))
    return _train_bpe(
        pre_tokenizers.Sequence(steps), None, size, pre_tokenizers.ByteLevel.alphabet()
    )


def _llama3(spec: Family, directory: Path) -> Any:
    """Llama 3.x: byte-level BPE (tiktoken converted), the special tokens after
    the vocabulary, a post-processor that puts <|begin_of_text|> first."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
    )
    from transformers import PreTrainedTokenizerFast

    vocab, merges = _byte_level_vocab(LLAMA3_PATTERN, False, 420)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True) for t in LLAMA3_SPECIAL])
    bos = backend.token_to_id("<|begin_of_text|>")
    backend.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single="<|begin_of_text|> $A",
                pair="<|begin_of_text|> $A <|begin_of_text|>:1 $B:1",
                special_tokens=[("<|begin_of_text|>", bos)],
            ),
        ]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        clean_up_tokenization_spaces=True,
        model_input_names=["input_ids", "attention_mask"],
    )
    tokenizer.chat_template = spec.chat_template
    tokenizer.save_pretrained(directory)

    def hub_config(data: dict[str, Any]) -> None:
        data["tokenizer_class"] = "PreTrainedTokenizerFast"
        data.pop("pad_token", None)

    _patch(directory, "tokenizer_config.json", hub_config)
    return tokenizer


def qwen_repo_tokenizer(vocab: dict[str, int], merges: list, extra: list, template: str) -> Any:
    """transformers' Qwen2Tokenizer as Qwen's repositories configure it
    (eos ``<|im_end|>``, pad ``<|endoftext|>``, no unknown token), with the
    ``extra`` added tokens and the chat ``template``."""
    from transformers import Qwen2Tokenizer

    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        errors="replace",
        split_special_tokens=False,
    )
    tokenizer.add_tokens(extra)
    tokenizer.chat_template = template
    return tokenizer


def _qwen(spec: Family, directory: Path) -> Any:
    """Qwen2/2.5/3: byte-level BPE with NFC and Qwen's split pattern; ChatML
    tokens after the vocabulary; no BOS."""
    from tokenizers import AddedToken
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    vocab, merges = _byte_level_vocab(PRETOKENIZE_REGEX, False, 400)
    extra = [AddedToken("<|im_start|>", special=True), AddedToken("<|im_end|>", special=True)]
    if spec.extra.get("think"):
        extra += [AddedToken("<think>", special=False), AddedToken("</think>", special=False)]
    vocab = dict(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = qwen_repo_tokenizer(vocab, merges, extra, spec.chat_template)
    tokenizer.save_pretrained(directory)

    def hub_config(data: dict[str, Any]) -> None:
        data["tokenizer_class"] = "Qwen2Tokenizer"
        data["bos_token"] = None
        data["unk_token"] = None
        data["add_prefix_space"] = False
        data["errors"] = "replace"
        data["model_max_length"] = 131072

    _patch(directory, "tokenizer_config.json", hub_config)
    return tokenizer


SMOLLM2_SPECIAL = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<repo_name>",
    "<reponame>",
    "<file_sep>",
    "<filename>",
    "<gh_stars>",
]


def _smollm2(spec: Family, directory: Path) -> Any:
    """SmolLM2: byte-level BPE whose tokenizer.json splits digits first; the
    special tokens at the start of the vocabulary; GPT2Tokenizer class."""
    from tokenizers import AddedToken
    from transformers import GPT2Tokenizer

    trained, merges = _byte_level_vocab(None, True, 400)
    vocab = {token: index for index, token in enumerate(SMOLLM2_SPECIAL)}
    for token in sorted(trained, key=trained.get):
        vocab.setdefault(token, len(vocab))
    tokenizer = GPT2Tokenizer(
        vocab=vocab,
        merges=merges,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
        add_prefix_space=False,
    )
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [AddedToken(t, special=True) for t in SMOLLM2_SPECIAL]}
    )
    tokenizer.chat_template = spec.chat_template
    tokenizer.save_pretrained(directory)

    def hub_file(data: dict[str, Any]) -> None:
        data["pre_tokenizer"] = {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Digits", "individual_digits": True},
                {
                    "type": "ByteLevel",
                    "add_prefix_space": False,
                    "trim_offsets": True,
                    "use_regex": True,
                },
            ],
        }
        data["post_processor"] = {
            "type": "ByteLevel",
            "add_prefix_space": True,
            "trim_offsets": False,
            "use_regex": True,
        }

    def hub_config(data: dict[str, Any]) -> None:
        data["tokenizer_class"] = "GPT2Tokenizer"

    _patch(directory, "tokenizer.json", hub_file)
    _patch(directory, "tokenizer_config.json", hub_config)
    return tokenizer


_TOKENIZERS: dict[str, Callable[[Family, Path], Any]] = {
    "sentencepiece": _sentencepiece,
    "llama3": _llama3,
    "qwen": _qwen,
    "smollm2": _smollm2,
}


# --------------------------------------------------------------------- model


def _special_id(tokenizer: Any, token: str | None) -> int | None:
    return None if token is None else tokenizer.convert_tokens_to_ids(token)


def _save_model(spec: Family, tokenizer: Any, directory: Path, seed: int) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    bos = _special_id(tokenizer, tokenizer.bos_token)
    eos = _special_id(tokenizer, tokenizer.eos_token)
    if spec.tokenizer == "llama3":
        eos_ids: int | list[int] = [
            tokenizer.convert_tokens_to_ids(t)
            for t in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")
        ]
    else:
        eos_ids = eos
    settings = dict(spec.config)
    config = AutoConfig.for_model(
        spec.model_type,
        vocab_size=len(tokenizer),
        bos_token_id=bos,
        eos_token_id=eos_ids,
        initializer_range=INIT_STD,
        torch_dtype="float32",
        **settings,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        # Norm weights start at one; perturb them so a decoder that skips one is caught.
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.add_(torch.randn_like(parameter) * 0.1)
            elif name.endswith(".bias"):
                parameter.normal_(0.0, INIT_STD)
    model.generation_config = GenerationConfig(bos_token_id=bos, eos_token_id=eos_ids)
    model.save_pretrained(directory, safe_serialization=True)
    if spec.hub_rope:
        _patch(directory, "config.json", _hub_rope(spec.config))


def _hub_rope(settings: dict[str, Any]) -> Callable[[dict[str, Any]], None]:
    """config.json as hub repositories saved by transformers 4 hold it:
    ``rope_theta`` and ``rope_scaling`` instead of ``rope_parameters``."""

    def change(data: dict[str, Any]) -> None:
        data.pop("rope_parameters", None)
        data["rope_theta"] = settings["rope_theta"]
        data["rope_scaling"] = settings["rope_scaling"]

    return change
