"""The inference engine: plain transformers and torch, no Ray.

Keeping Ray out of this module lets unit tests, notebooks and GPU benchmarks
(on machines without Ray) drive exactly the code that replicas run.

One call to :meth:`Engine.generate` decodes a batch of independent requests
together. Each request keeps its own ``max_new_tokens``, ``temperature``,
``top_p`` and seed, which ``model.generate`` cannot do within one batch, so
the decoding loop is written out here: one prefill over the left-padded
prompts, then one forward pass per new token for the whole batch.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from helpers.embedded_model import ensure_converted, is_embedded


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt and the sampling parameters it asked for."""

    prompt: str
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int | None = None


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end-of-sequence token) or "length"


class ModelLoadError(RuntimeError):
    """``MODEL_ID`` names nothing that can be loaded here."""


class PromptTooLongError(ValueError):
    """The prompt plus the tokens asked for do not fit the model's context."""


@dataclass
class BatchStats:
    """Counters a test or a metric can read to see batching at work."""

    batches: int = 0
    sequences: int = 0
    largest_batch: int = 0


def resolve_model_source(model_id: str, cache_dir: Path) -> tuple[str, dict[str, Any]]:
    """Map ``MODEL_ID`` to the arguments ``from_pretrained`` needs.

    A hub id is passed through unchanged: transformers reads it from the
    Hugging Face cache, and with ``HF_HUB_OFFLINE=1`` from the cache alone.
    """
    if is_embedded(model_id):
        return str(ensure_converted(cache_dir)), {}
    path = Path(model_id).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"MODEL_ID points to a missing GGUF file: {path}")
        return str(path.parent), {"gguf_file": path.name}
    if path.is_dir():
        return str(path), {}
    return model_id, {}


def pick_device(want_gpu: bool) -> tuple[str, torch.dtype]:
    """CUDA in half precision when a GPU was requested and is present, else CPU fp32.

    fp16 on CPU is slower than fp32 and loses accuracy, so CPU stays fp32.
    """
    if want_gpu and torch.cuda.is_available():
        return "cuda", torch.float16
    return "cpu", torch.float32


class Engine:
    """A loaded model and tokenizer that decode batches of requests."""

    def __init__(
        self,
        model_id: str,
        cache_dir: Path,
        *,
        want_gpu: bool = False,
        cpu_threads: int | None = None,
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        started = time.perf_counter()
        if cpu_threads is not None:
            torch.set_num_threads(cpu_threads)
        self.model_id = model_id
        self.device, self.dtype = pick_device(want_gpu)
        source, extra = resolve_model_source(model_id, cache_dir)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source, **extra)
        except (OSError, ValueError) as err:
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
            raise ModelLoadError(
                f"MODEL_ID={model_id!r} cannot be loaded: {first_line} (a hub id must be "
                "in the Hugging Face cache when the hub is unreachable)"
            ) from err
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(source, dtype=self.dtype, **extra)
        self.model.to(self.device).eval()
        self.context_length = _context_length(self.model.config)
        self.eos_token_ids = _eos_token_ids(self.model, self.tokenizer)
        self.stats = BatchStats()
        self._stats_lock = threading.Lock()
        self.load_seconds = time.perf_counter() - started

    def format_prompt(self, text: str, prompt_format: str) -> str:
        """Wrap ``text`` as one user turn when the chat template applies.

        Instruction-tuned models answer a bare prompt poorly: SmolLM2 rambles
        on "Write a haiku about Ray Serve." but writes a haiku when the same
        words arrive as a user message.
        """
        use_chat = prompt_format == "chat" or (
            prompt_format == "auto" and self.tokenizer.chat_template is not None
        )
        if not use_chat:
            return text
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
        )

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text)["input_ids"])

    def check_fits(self, request: GenerationRequest) -> None:
        """Refuse a request whose prompt plus new tokens exceed the context."""
        needed = self.count_tokens(request.prompt) + request.max_new_tokens
        if needed > self.context_length:
            raise PromptTooLongError(
                f"prompt tokens plus max_new_tokens ({needed}) exceed the model's "
                f"context length ({self.context_length})"
            )

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Completion]:
        """Decode all ``requests`` in one batch; completions hold only new text."""
        if not requests:
            return []
        with self._stats_lock:
            self.stats.batches += 1
            self.stats.sequences += len(requests)
            self.stats.largest_batch = max(self.stats.largest_batch, len(requests))
        with torch.inference_mode():
            return self._decode(requests)

    def _decode(self, requests: Sequence[GenerationRequest]) -> list[Completion]:
        batch = self.tokenizer([r.prompt for r in requests], return_tensors="pt", padding=True).to(
            self.device
        )
        attention_mask = batch["attention_mask"]
        # Left padding shifts each prompt right; positions must count real tokens
        # only, or a prompt would decode differently alone than in a batch.
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        samplers = [_Sampler(r, self.device) for r in requests]
        limits = [r.max_new_tokens for r in requests]
        new_tokens: list[list[int]] = [[] for _ in requests]
        finish = ["length"] * len(requests)
        running = list(range(len(requests)))

        from transformers import DynamicCache

        cache = DynamicCache()
        output = self.model(
            input_ids=batch["input_ids"],
            attention_mask=attention_mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        for _step in range(max(limits)):
            logits = output.logits[:, -1, :].float()
            next_ids = torch.full((len(requests),), self.tokenizer.pad_token_id, device=self.device)
            still_running = []
            for row in running:
                token = samplers[row].pick(logits[row])
                next_ids[row] = token
                if token in self.eos_token_ids:
                    finish[row] = "stop"
                    continue
                new_tokens[row].append(token)
                if len(new_tokens[row]) < limits[row]:
                    still_running.append(row)
            running = still_running
            if not running:
                break
            attention_mask = torch.cat(
                [attention_mask, attention_mask.new_ones((len(requests), 1))], dim=1
            )
            positions = positions[:, -1:] + 1
            output = self.model(
                input_ids=next_ids[:, None],
                attention_mask=attention_mask,
                position_ids=positions,
                cache=cache,
                use_cache=True,
            )
        prompt_lengths = batch["attention_mask"].sum(-1).tolist()
        return [
            Completion(
                text=self.tokenizer.decode(tokens, skip_special_tokens=True),
                prompt_tokens=prompt_lengths[i],
                completion_tokens=len(tokens),
                finish_reason=finish[i],
            )
            for i, tokens in enumerate(new_tokens)
        ]


class _Sampler:
    """Picks one request's next token: greedy at temperature 0, else nucleus sampling."""

    def __init__(self, request: GenerationRequest, device: str) -> None:
        self.temperature = request.temperature
        self.top_p = request.top_p
        self.generator: torch.Generator | None = None
        if request.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(request.seed)

    def pick(self, logits: torch.Tensor) -> int:
        if self.temperature == 0:
            return int(logits.argmax())
        probs = torch.softmax(logits / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            # Keep the smallest prefix whose mass reaches top_p (always >= 1 token).
            outside = sorted_probs.cumsum(-1) - sorted_probs >= self.top_p
            sorted_probs[outside] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=self.generator))


def _context_length(config: Any) -> int:
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def _eos_token_ids(model: Any, tokenizer: Any) -> set[int]:
    ids = model.generation_config.eos_token_id
    if ids is None:
        ids = tokenizer.eos_token_id
    return set(ids) if isinstance(ids, list) else {ids}
