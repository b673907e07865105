"""A tokenizer read straight from ``tokenizer.json``, without transformers.

Why: importing transformers for ``AutoTokenizer`` costs seconds of every
cold start on a small machine (``bench/RESULTS.md``). transformers only wraps
the ``tokenizers`` library this module calls directly, and the chat template
is rendered the way transformers renders it (a sandboxed Jinja environment
with the same options, extra arguments such as Qwen3's ``enable_thinking``
passed through).

What ``AutoTokenizer`` of transformers 5 does, and so what this module does
(``_loader``), for the classes the kit's decoder families ship with:

- ``TokenizersBackend``/``PreTrainedTokenizerFast`` (Llama 3.x, the embedded
  model), and any class under ``model_type`` mistral (its registered class is
  the generic one): tokenizer.json as it is. So is ``LlamaTokenizer`` over a
  ByteLevel tokenizer.json (Llama 3 repos naming it).
- ``Qwen2Tokenizer`` (Qwen2/2.5/3; forced for ``model_type`` qwen2 whatever
  the repo names), ``GPT2Tokenizer`` (SmolLM2), ``LlamaTokenizer`` (Llama 2,
  TinyLlama): the class keeps tokenizer.json's vocabulary, merges, added
  tokens and post-processor but rebuilds BPE's settings, normalizer,
  pre-tokenizer and decoder from its own definition (``_rebuild`` does the
  same). LlamaTokenizer's Metaspace prepends "▁" to the first piece only
  where the hub's legacy normalizer prepends it after every special token;
  GPT2Tokenizer drops SmolLM2's Digits pre-tokenizer (no change in ids, as
  its vocabulary has no token spanning a digit and anything else).
- ``add_bos_token``/``add_eos_token`` in tokenizer_config.json are ignored
  when tokenizer.json exists: its post-processor decides. Special tokens the
  config omits take the class's defaults; the pad token falls back to eos as
  the engine does with transformers' tokenizer. ``chat_template.jinja``
  wins over the config's ``chat_template``. ``clean_up_tokenization_spaces``
  is ignored for BPE.

Reproducing the rebuild rather than refusing a mismatching file keeps the
fast path for real Llama 2 and SmolLM2 repos. Anything else returns None and
is left to transformers (``helpers/engine/engine.py``): remote code
(``auto_map``), ``split_special_tokens``, other classes or model types, a
non-BPE model under a rebuilding class, Mistral repos that could take
``MistralCommonBackend`` or the Tekken regex fix, named chat templates.
tests/model/test_family_tokenizers.py checks ids, text, special ids and chat
prompts against ``AutoTokenizer`` on every family.

It offers the part of transformers' tokenizer interface the kit uses, so the
engine, the batcher and the text stream take either.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import torch
from jinja2.exceptions import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
from tokenizers import Tokenizer as Backend

GENERIC_CLASSES = frozenset({"TokenizersBackend", "PreTrainedTokenizerFast"})
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")
# The tokenizer class each model type is registered with in transformers 5
# (models/auto/tokenization_auto.py), for the model types the kit decodes.
REGISTERED = {
    "llama": None,
    "mistral": "TokenizersBackend",
    "qwen2": "Qwen2Tokenizer",
    "qwen3": "Qwen2Tokenizer",
}
HUB_CLASS_OVERRIDDEN = frozenset(
    {"qwen2"}
)  # transformers' MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS
MISTRAL_TYPES = frozenset({"mistral", "mistral3", "mixtral", "pixtral", "voxtral"})
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Special tokens a class's constructor defaults to when tokenizer_config.json omits them.
CLASS_DEFAULTS: dict[str, dict[str, str | None]] = {
    "Qwen2Tokenizer": {
        "unk_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
    },
    "GPT2Tokenizer": {
        "unk_token": "<|endoftext|>",
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
    },
    "LlamaTokenizer": {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"},
}


class Tokenizer:
    """``tokenizers`` plus the special tokens and chat template around it."""

    def __init__(
        self, backend: Backend, special: Mapping[str, str], chat_template: str | None
    ) -> None:
        self.backend = backend
        self.special = dict(special)
        self.chat_template = chat_template
        self.padding_side = "left"
        self._template = _compile(chat_template) if chat_template else None

    @classmethod
    def from_directory(cls, directory: Path) -> Tokenizer | None:
        """The tokenizer saved in ``directory`` as ``AutoTokenizer`` would load
        it, or None where only transformers' own code can be sure to."""
        config_file, tokenizer_file, model_file = (
            directory / "tokenizer_config.json",
            directory / "tokenizer.json",
            directory / "config.json",
        )
        if not (config_file.is_file() and tokenizer_file.is_file()):
            return None
        config = json.loads(config_file.read_text())
        model_type = (
            json.loads(model_file.read_text()).get("model_type") if model_file.is_file() else None
        )
        text = tokenizer_file.read_text()
        kind = _loader(config, model_type, text)
        data = json.loads(text)
        bpe = data.get("model", {}).get("type") == "BPE"
        if kind is None or (kind != "verbatim" and not bpe):
            return None
        if config.get("clean_up_tokenization_spaces") and not bpe:
            return None  # transformers' clean-up runs on WordPiece and Unigram output
        template_file = directory / "chat_template.jinja"
        template = (
            template_file.read_text() if template_file.is_file() else config.get("chat_template")
        )
        if template is not None and not isinstance(template, str):
            return None  # named templates
        pipeline = _rebuild(kind, data["model"], config) if kind != "verbatim" else None
        backend = Backend.from_str(json.dumps(data))
        if pipeline is not None:
            backend.normalizer, backend.pre_tokenizer, backend.decoder = pipeline
        named = CLASS_DEFAULTS.get(kind, {}) | {
            name: config[name] for name in SPECIAL_TOKENS if name in config
        }
        special = {name: _content(token) for name, token in named.items() if token}
        missing = [token for token in special.values() if backend.token_to_id(token) is None]
        backend.add_special_tokens([AddedToken(token, special=True) for token in missing])
        if "pad_token" not in special and "eos_token" in special:
            special["pad_token"] = special["eos_token"]
        return cls(backend, special, template)

    def _id(self, name: str) -> int | None:
        token = self.special.get(name)
        return None if token is None else self.backend.token_to_id(token)

    @property
    def eos_token(self) -> str | None:
        return self.special.get("eos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._id("pad_token")

    def __call__(
        self,
        text: str | Sequence[str],
        *,
        add_special_tokens: bool = True,
        padding: bool = False,
        return_tensors: str | None = None,
    ) -> dict[str, Any]:
        """Token ids and attention mask as transformers' tokenizers return
        them: lists, or left-padded tensors for ``return_tensors="pt"``; one
        row without a batch dimension for one text, unless it asks for tensors."""
        texts = [text] if isinstance(text, str) else list(text)
        rows = [
            e.ids for e in self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)
        ]
        width = max(map(len, rows)) if padding or return_tensors == "pt" else 0
        pad = self.pad_token_id or 0
        ids = [[pad] * (width - len(row)) + row for row in rows]
        mask = [[0] * (width - len(row)) + [1] * len(row) for row in rows]
        if return_tensors == "pt":
            return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}
        if isinstance(text, str):
            return {"input_ids": ids[0], "attention_mask": mask[0]}
        return {"input_ids": ids, "attention_mask": mask}

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = False,
        tokenize: bool = False,
        **kwargs: Any,
    ) -> str:
        if self._template is None:
            raise ValueError("this tokenizer has no chat template")
        if tokenize:
            raise NotImplementedError("render the text, then call the tokenizer on it")
        context = {"tools": None, "documents": None} | self.special | kwargs
        return self._template.render(
            messages=list(messages), add_generation_prompt=add_generation_prompt, **context
        )


def _loader(config: Mapping[str, Any], model_type: str | None, text: str) -> str | None:
    """How ``AutoTokenizer`` of transformers 5 builds this tokenizer:
    ``"verbatim"`` from tokenizer.json, or the name of the class that rebuilds
    the pipeline from its own definition; None where the kit cannot follow."""
    if config.get("auto_map") or config.get("split_special_tokens"):
        return None
    hub = config.get("tokenizer_class") or ""
    name = "generic" if hub in GENERIC_CLASSES else hub.removesuffix("Fast")
    if model_type in MISTRAL_TYPES and (find_spec("mistral_common") or '"ByteLevel"' in text):
        return None  # MistralCommonBackend, or the Tekken pre-tokenizer fix
    if name == "generic" and model_type not in HUB_CLASS_OVERRIDDEN:
        return "verbatim"
    if model_type not in REGISTERED:
        return None
    registered = REGISTERED[model_type]
    overridden = model_type in HUB_CLASS_OVERRIDDEN
    if name == "LlamaTokenizer" and not overridden and '"ByteLevel"' in text:
        return "verbatim"  # Llama 3 repos that name LlamaTokenizer
    if registered is not None and registered != name:
        if registered in GENERIC_CLASSES:
            return "verbatim"
        name = registered if overridden else name
    return name if name in CLASS_DEFAULTS else None


def _rebuild(kind: str, model: dict[str, Any], config: Mapping[str, Any]) -> tuple[Any, Any, Any]:
    """What the class's constructor puts around tokenizer.json's vocabulary
    and merges: the BPE settings (changed in ``model`` in place) and the
    normalizer, pre-tokenizer and decoder, whatever tokenizer.json says."""
    space = config.get("add_prefix_space")
    model.update(dropout=None, ignore_merges=False, unk_token=None)
    if kind == "LlamaTokenizer":
        space = True if space is None else space
        scheme = ("always" if config.get("legacy", False) else "first") if space else "never"
        model.update(fuse_unk=True, byte_fallback=True)
        model.update(continuing_subword_prefix=None, end_of_word_suffix=None)
        steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        steps += [decoders.Strip(content=" ", left=1)] if space else []
        metaspace = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=False)
        return None, metaspace, decoders.Sequence(steps)
    model.update(fuse_unk=False, byte_fallback=False)
    model.update(continuing_subword_prefix="", end_of_word_suffix="")
    if kind == "GPT2Tokenizer":
        return None, pre_tokenizers.ByteLevel(add_prefix_space=bool(space)), decoders.ByteLevel()
    split = pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=bool(space), use_regex=False)
    return (
        normalizers.NFC(),
        pre_tokenizers.Sequence([split, byte_level]),
        decoders.ByteLevel(),
    )


def _content(token: str | Mapping[str, Any]) -> str:
    """A special token as ``tokenizer_config.json`` writes it: text, or an
    object holding it under ``content``."""
    return token if isinstance(token, str) else str(token["content"])


def _compile(template: str) -> Any:
    """The chat template in the environment transformers renders it in: chat
    templates come from model repositories, so the sandbox matters."""
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise
    environment.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return environment.from_string(template)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """Unlike Jinja's own filter, no HTML escaping: the output is a prompt."""
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise(message: str) -> None:
    raise TemplateError(message)
