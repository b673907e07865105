"""A tokenizer read straight from ``tokenizer.json``, without transformers.

Why: importing transformers for ``AutoTokenizer`` costs seconds of every
cold start on a small machine (``bench/RESULTS.md``). For a checkpoint whose tokenizer is wholly
described by its ``tokenizer.json`` (``tokenizer_config.json`` names the
generic class, ``TokenizersBackend`` or ``PreTrainedTokenizerFast``, as the
embedded model's does), transformers only wraps the ``tokenizers`` library
that this module calls directly; the chat template is rendered the way
transformers renders it (a sandboxed Jinja environment with the same options).
Checkpoints with a model-specific tokenizer class keep transformers'
(``helpers/engine/engine.py``), and a model test checks that both give the same ids,
text and chat prompts.

It offers the part of transformers' tokenizer interface the kit uses, so the
engine, the batcher and the text stream take either.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from jinja2.exceptions import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as Backend

GENERIC_CLASSES = frozenset({"TokenizersBackend", "PreTrainedTokenizerFast"})
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")


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
        """The tokenizer saved in ``directory``, or None when it needs
        transformers' model-specific code."""
        config_file, tokenizer_file = (
            directory / "tokenizer_config.json",
            directory / "tokenizer.json",
        )
        if not (config_file.is_file() and tokenizer_file.is_file()):
            return None
        config = json.loads(config_file.read_text())
        if config.get("tokenizer_class") not in GENERIC_CLASSES:
            return None
        special = {name: _content(config[name]) for name in SPECIAL_TOKENS if config.get(name)}
        if "pad_token" not in special and "eos_token" in special:
            special["pad_token"] = special["eos_token"]
        template_file = directory / "chat_template.jinja"
        template = (
            template_file.read_text() if template_file.is_file() else config.get("chat_template")
        )
        return cls(Backend.from_file(str(tokenizer_file)), special, template)

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
    ) -> str:
        if self._template is None:
            raise ValueError("this tokenizer has no chat template")
        if tokenize:
            raise NotImplementedError("render the text, then call the tokenizer on it")
        return self._template.render(
            messages=list(messages),
            tools=None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **self.special,
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
