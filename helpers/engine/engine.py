"""The inference engine: torch (and transformers for other models), no Ray.

Keeping Ray out of this module lets unit tests, notebooks and GPU benchmarks
(on machines without Ray) drive exactly the code that replicas run.

The engine loads the model (picking device, dtype and CPU threads): a
safetensors checkpoint of the Llama, Mistral or Qwen families (the embedded
model among them) with the kit's own :mod:`helpers.engine.llama` and
:mod:`helpers.engine.tokenizer`, which start seconds sooner and decode
faster, anything else with transformers' Auto classes; :attr:`Engine.info`
says which. It formats and
measures prompts, and hands requests to a continuous batcher
(:mod:`helpers.engine.batcher`) that decodes every request in flight
together. Each request keeps its own ``max_new_tokens``, ``temperature``,
``top_p`` and seed, which ``model.generate`` cannot do within one batch.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from jinja2 import TemplateError

from helpers.engine import gguf_checkpoint
from helpers.engine.batcher import (
    BatchLoad,
    BatchStats,
    ContinuousBatcher,
    GenerationRequest,
    LogprobCallback,
    TextCallback,
    check_vocabulary,
    prompt_token_ids,
)
from helpers.engine.chat_prompt import chat_turns, template_renders_tools
from helpers.engine.cpu_linear import prepack_pieces
from helpers.engine.cpu_weights import quantize_linear_layers
from helpers.engine.decoder import Decoder, TransformersDecoder
from helpers.engine.embedded_model import ensure_converted, is_embedded
from helpers.engine.errors import ModelLoadError
from helpers.engine.gguf_linear import GgufLinear
from helpers.engine.hub import is_hub_id, snapshot_directory
from helpers.engine.int8_linear import Int8Linear
from helpers.engine.kv_budget import KVPlan, gpu_kv_plan
from helpers.engine.layer_ops import LayerOps
from helpers.engine.llama_config import UnsupportedCheckpoint, llama_config
from helpers.engine.llama_loading import load_llama
from helpers.engine.padded_rows import PREFILL_CHUNK, ROW_GROUPS
from helpers.engine.tokenizer import Tokenizer
from helpers.protocol import (
    Completion,
    FieldError,
    Function,
    Grammar,
    GrammarError,
    Message,
    PromptTooLongError,
    Sampling,
    TokenIdError,
    TokenLogprob,
)

logger = logging.getLogger(__name__)

SCORING_CHUNK = 256
"""Prompt tokens scored per forward pass by :meth:`Engine.prompt_logprobs`:
their logits (a vocabulary's worth each) are all that is held at once."""

STALLED_AFTER_S = 120.0
"""The least time a decode loop spends on one turn (a step, a prefill, a
chore piece) before the health check calls it stuck and Serve replaces the
replica. :meth:`Engine.probe` waits longer where requests may: a turn that
outlasts every request's deadline serves no one, while a shorter one may be
a long admission of long prompts on a slow CPU."""

__all__ = [
    "Completion",
    "Engine",
    "GenerationRequest",
    "Grammar",
    "GrammarError",
    "LogprobCallback",
    "ModelLoadError",
    "PromptTooLongError",
    "Sampling",
    "TextCallback",
    "TokenIdError",
]


@dataclass(frozen=True)
class LoadTimes:
    """Where an engine's start went, in seconds: the cold-start breakdown.

    Imports come first and alone, so ``weights_s`` is reading the weights and
    building the model, not Python loading transformers' modelling code.
    """

    imports_s: float
    tokenizer_s: float
    weights_s: float
    warm_up_s: float

    @property
    def total_s(self) -> float:
        return self.imports_s + self.tokenizer_s + self.weights_s + self.warm_up_s


class _Laps:
    """Seconds between one call of :meth:`lap` and the one before, by name:
    each phase of a load is timed under the name it is reported by."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name], self._last = now - self._last, now


def resolve_model_source(model_id: str, cache_dir: Path) -> str:
    """Map ``MODEL_ID`` to the directory the kit's decoder (or transformers) reads.

    A GGUF file, the embedded model's included, becomes its converted copy in
    ``cache_dir``; a hub id, its snapshot in the Hugging Face cache, read
    offline when it is there and downloaded otherwise
    (:mod:`helpers.engine.hub`). So every model is loaded from a local
    directory, and the kit's decoder runs hub models of its families too.
    """
    if is_embedded(model_id):
        return str(ensure_converted(cache_dir))
    path = Path(model_id).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"MODEL_ID points to a missing GGUF file: {path}")
        copy = gguf_checkpoint.cached_copy(path, cache_dir)
        return str(gguf_checkpoint.ensure_converted(path, copy))
    if is_hub_id(model_id):
        return str(snapshot_directory(model_id))
    return str(path)


def load_tokenizer(model_id: str, cache_dir: Path) -> Any:
    """The model's tokenizer, padding on the left as batched decoding needs."""
    return _tokenizer_from(model_id, resolve_model_source(model_id, cache_dir))


def _tokenizer_from(model_id: str, source: str) -> Any:
    local = Tokenizer.from_directory(Path(source)) if Path(source).is_dir() else None
    if local is not None:
        return local
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
        raise ModelLoadError(f"MODEL_ID={model_id!r} cannot be loaded: {first_line}") from err
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""``DTYPE``'s choices besides ``auto``."""


def pick_device(want_gpu: bool, dtype: str = "auto") -> tuple[str, torch.dtype]:
    """CUDA when a GPU was requested and is present, else the CPU; ``dtype``
    as ``DTYPE`` names it.

    ``auto`` is bfloat16 on a GPU that computes in it natively (compute
    capability 8.0 and up; torch calls a T4's emulated bf16 "supported" too,
    hence the capability check), float16 on older GPUs, and float32 on CPU,
    where half precisions are slower and lose accuracy.
    """
    device = "cuda" if want_gpu and torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device, DTYPES.get(dtype, torch.float32)
    native_bf16 = torch.cuda.get_device_capability() >= (8, 0)
    if dtype == "bfloat16" and not native_bf16:
        logger.warning(
            "DTYPE=bfloat16 on a GPU of compute capability %s is emulated, and slow: "
            "float16 (DTYPE=auto) is its own",
            ".".join(map(str, torch.cuda.get_device_capability())),
        )
    if dtype != "auto":
        return device, DTYPES[dtype]
    return device, torch.bfloat16 if native_bf16 else torch.float16


def not_finite(dtype: torch.dtype) -> str:
    """Why a probe failed, and in half precision what to try: some models'
    activations outgrow float16's range, which a load then shows first."""
    reason = f"the model's logits are not finite in {str(dtype).removeprefix('torch.')}"
    if dtype == torch.float16:
        return f"{reason}: try DTYPE=float32, or DTYPE=bfloat16 on compute capability 8.0 and up"
    if dtype == torch.bfloat16:
        return f"{reason}: try DTYPE=float32"
    return reason


@dataclass(frozen=True)
class EngineInfo:
    """Which path serves the model, for ``/healthz`` and ``/v1/models``: a user
    (and a test) can tell the kit's decoder from transformers' fallback."""

    implementation: str
    """``kit-decoder`` or ``transformers``."""
    architecture: str
    dtype: str
    device: str
    weights: str
    """How the linear layers are stored: GGUF block kinds, or the dtype."""
    fallback_reason: str | None
    """Why the kit's decoder does not run this model, when it does not."""
    gpu_kernels: tuple[str, ...] | None = None
    """The kit's Triton kernels serving the kit's decoder on a GPU
    (``paged_attention``, ``fused_layer_ops``). One left out failed its
    check at load or does not apply to this GPU and dtype (the replica's
    log says which); None off a GPU or on transformers' path."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Engine:
    """A model and its tokenizer, decoding batches of requests together."""

    def __init__(
        self,
        model: Decoder,
        tokenizer: Any,
        *,
        model_id: str,
        max_batch_size: int = 16,
        slots: bool | None = None,
        kv_plan: KVPlan | None = None,
        prefill_chunk: int = PREFILL_CHUNK,
        long_prompt_tokens: int | None = None,
        row_groups: int = ROW_GROUPS,
        prefix_cache_bytes: int = 0,
    ) -> None:
        """Wrap a model already in memory (what :meth:`load` reads from disk).
        ``slots`` picks the batch's layout, ``prefill_chunk`` how much of
        the prompts waiting a pass of the padded one prefills and
        ``long_prompt_tokens`` which of them let shorter ones pass, and
        ``row_groups`` how many groups of rows it keeps apart and
        ``prefix_cache_bytes`` how much of its ended rows' cache it keeps, as
        :class:`ContinuousBatcher` says; ``kv_plan`` fixes a paged cache's
        size and its prefill passes' (a GPU replica's share of memory), which
        may also shorten the context."""
        self.model_id = model_id
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.context_length = _context_length(model.config)
        self._context_limit = "the model's context length"
        self.eos_token_ids = _eos_token_ids(model, tokenizer)
        if kv_plan is not None and kv_plan.positions < self.context_length:
            self.context_length = kv_plan.positions
            self._context_limit = (
                "the positions this replica's share of its GPU holds (GPU_MEMORY_FRACTION)"
            )
        self._batcher = ContinuousBatcher(
            model,
            tokenizer,
            self.eos_token_ids,
            max_batch_size,
            slots,
            max_positions=self.context_length,
            pages=None if kv_plan is None else kv_plan.pages,
            prefill_area=None if kv_plan is None else kv_plan.prefill_area,
            prefill_chunk=prefill_chunk,
            long_prompt_tokens=long_prompt_tokens,
            row_groups=row_groups,
            prefix_cache_bytes=prefix_cache_bytes,
        )
        self.load_times: LoadTimes | None = None
        self.tuned: Future[None] | None = None
        self.info = describe(model)

    @classmethod
    def load(
        cls,
        model_id: str,
        cache_dir: Path,
        *,
        want_gpu: bool = False,
        cpu_threads: int | None = None,
        max_batch_size: int = 16,
        prepack: bool = True,
        dtype: str = "auto",
        cpu_weights: str = "auto",
        slots: bool | None = None,
        tokenizer: Any | None = None,
        gpu_memory_fraction: float = 0.9,
        prefill_chunk: int = PREFILL_CHUNK,
        prefix_cache_bytes: int = 0,
    ) -> Engine:
        """Load ``MODEL_ID`` (picking device, ``DTYPE`` and CPU threads) and run
        one warm-up pass, timing each step into ``load_times``. A ``tokenizer``
        loaded ahead for this very model (by a spare replica process) is used
        as it is.

        On CPU in float32 the kit's decoder stores linear layers as
        ``CPU_WEIGHTS`` says: ``auto`` keeps a GGUF model's 4-bit blocks (the
        embedded model's included; :mod:`helpers.engine.gguf_linear`),
        ``q8_0`` quantizes any model's at load
        (:mod:`helpers.engine.cpu_weights`), ``float32`` keeps float32 weights.
        Any fp32 linear layers left get prepacked
        for oneDNN (:mod:`helpers.engine.cpu_linear`) unless ``prepack`` is False: a module's
        layers at a time, between decode steps or when the engine is idle,
        so the time it takes stays out of a cold start and
        reaches a replica that starts under load. ``tuned`` resolves when it
        is done.

        On a GPU the kit's decoder keeps its paged cache within
        ``gpu_memory_fraction`` of the device (``GPU_MEMORY_FRACTION``;
        :mod:`helpers.engine.kv_budget`), weights included; a model that
        transformers serves is held to it by torch's allocator. On CPU the kit's
        decoder prefills at most ``prefill_chunk`` prompt tokens a pass
        (``PREFILL_CHUNK_TOKENS``) beside the sequences it decodes, and keeps
        ``prefix_cache_bytes`` of its ended rows' cache (``PREFIX_CACHE_MB``);
        slots keep their full pages while no new sequence needs them, where
        that is above 0.
        """
        laps = _Laps()
        if cpu_threads is not None:
            torch.set_num_threads(cpu_threads)
        device, torch_dtype = pick_device(want_gpu, dtype)
        source = resolve_model_source(model_id, cache_dir)
        try:  # the kit's decoder runs it, or transformers does
            kit_config, fallback_reason = llama_config(Path(source)), None
        except UnsupportedCheckpoint as unsupported:
            kit_config, fallback_reason = None, str(unsupported)
            logger.info("MODEL_ID=%r runs on transformers: %s", model_id, fallback_reason)
            _import_model_code(source)
        laps.lap("imports_s")
        if tokenizer is None:
            tokenizer = _tokenizer_from(model_id, source)
        laps.lap("tokenizer_s")
        on_cpu_fp32 = (device, torch_dtype) == ("cpu", torch.float32)
        if device == "cuda":
            # A model transformers serves has no paged cache sized to the share:
            # torch's allocator holds it there. The kit's decoder sizes its own,
            # and a cap left by an earlier engine in this process is lifted.
            cap = gpu_memory_fraction if kit_config is None else 1.0
            torch.cuda.set_per_process_memory_fraction(cap)
        if kit_config is not None:
            blocks = on_cpu_fp32 and cpu_weights == "auto"
            model = load_llama(Path(source), kit_config, torch_dtype, device, blocks)
            if on_cpu_fp32 and cpu_weights == "q8_0":
                quantize_linear_layers(model)
        else:
            model = _transformers_model(source, torch_dtype, device)
        laps.lap("weights_s")
        on_gpu_slots = device == "cuda" and kit_config is not None and slots is not False
        engine = cls(
            model,
            tokenizer,
            model_id=model_id,
            max_batch_size=max_batch_size,
            slots=slots,
            prefill_chunk=prefill_chunk,
            prefix_cache_bytes=prefix_cache_bytes,
            kv_plan=gpu_kv_plan(
                model, gpu_memory_fraction, _context_length(model.config), max_batch_size
            )
            if on_gpu_slots
            else None,
        )
        try:  # a load that fails must not leave the decode thread holding the model
            engine.info = describe(model, fallback_reason)
            engine.probe()
            laps.lap("warm_up_s")
            engine.load_times = LoadTimes(**laps.seconds)
            if kit_config is not None and prepack and device == "cpu":
                engine.tuned = engine.between_steps(prepack_pieces(model, max_batch_size))
        except BaseException:
            engine.close()
            raise
        return engine

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
        return self.render_chat([{"role": "user", "content": text}])

    def render_chat(
        self, messages: Sequence[Mapping[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> str:
        """A conversation as the model was trained to read it, ending where the
        assistant's next turn begins; ``tools`` go to a template that renders them.

        A model without a chat template (a base model such as opt-125m) gets
        plain ``role: content`` lines, which base models continue sensibly.
        A template that refuses the conversation (Mistral's and Llama 2's
        ``raise_exception`` when roles do not alternate, which raises a plain
        ``TemplateError``) is the client's to fix:
        :class:`~helpers.protocol.FieldError` names ``messages``.
        """
        if self.tokenizer.chat_template is None:
            lines = [f"{m['role']}: {m['content']}" for m in messages]
            return "\n".join([*lines, "assistant:"])
        try:
            return self.tokenizer.apply_chat_template(
                [dict(m) for m in messages], tools=tools, add_generation_prompt=True, tokenize=False
            )
        except TemplateError as err:
            if type(err) is not TemplateError:  # the template's own fault (syntax, a name)
                raise
            raise FieldError(
                "messages", f"messages: the chat template refused them: {err}"
            ) from err

    def render_conversation(
        self, messages: Sequence[Message], functions: Sequence[Function] = ()
    ) -> str:
        """A client's chat and the functions it offers, written for this
        model's template (:mod:`helpers.engine.chat_prompt`)."""
        native = template_renders_tools(self.tokenizer.chat_template)
        turns, tools = chat_turns(messages, functions, native)
        return self.render_chat(turns, tools)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text)["input_ids"])

    def request(self, prompt: str | tuple[int, ...], sampling: Sampling) -> GenerationRequest:
        """A request for ``prompt`` (text formatted already, or token ids),
        refused before any work if it cannot fit
        (:class:`~helpers.protocol.PromptTooLongError`), names a token the
        model does not have (:class:`~helpers.protocol.TokenIdError`) or asks
        for a grammar that does not compile (:class:`~helpers.protocol.GrammarError`).

        A grammar is compiled here, its first mask included, on the caller's
        thread: a replica calls this on a worker thread, and submits on its
        event loop."""
        ids = tuple(prompt_token_ids(self.tokenizer, prompt))
        request = GenerationRequest(prompt, sampling, prompt_ids=ids)
        self.check_fits(request)
        self.check_token_ids(request)
        if sampling.grammar is None:
            return request
        return replace(request, grammar=self._batcher.grammars.compile(sampling.grammar))

    def check_fits(self, request: GenerationRequest) -> None:
        """Refuse a request whose prompt plus new tokens exceed the context."""
        needed = len(request.token_ids(self.tokenizer)) + request.sampling.max_new_tokens
        if needed > self.context_length:
            raise PromptTooLongError(
                f"prompt tokens plus max_new_tokens ({needed}) exceed {self._context_limit} "
                f"({self.context_length})"
            )

    def together(self) -> AbstractContextManager[object]:
        """Requests submitted inside this block are admitted in one step
        where the batch has room for them all, so a request's ``n`` choices
        share one prefill (:meth:`ContinuousBatcher.together`)."""
        return self._batcher.together()

    def check_token_ids(self, request: GenerationRequest) -> None:
        """Refuse a token id the model has no logit for, naming its field:
        only here is the vocabulary known."""
        sampling = request.sampling
        if isinstance(request.prompt, tuple):
            self.check_vocabulary("prompt", request.prompt)
        self.check_vocabulary("logit_bias", [token for token, _ in sampling.logit_bias])
        self.check_vocabulary("stop_token_ids", sampling.stop_token_ids)

    def check_vocabulary(self, field: str, tokens: Sequence[int]) -> None:
        """Raise :class:`~helpers.protocol.TokenIdError` naming ``field`` for
        the first of ``tokens`` outside the model's vocabulary."""
        check_vocabulary(field, tokens, self.model.config.vocab_size)

    def close(self) -> None:
        """Stop the decode loop (the batch in flight finishes; whatever waits is
        refused), so a process that builds engines one after another does not
        keep every earlier model and its cache alive until it exits."""
        self._batcher.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def submit(
        self,
        request: GenerationRequest,
        on_text: TextCallback | None = None,
        on_logprob: LogprobCallback | None = None,
    ) -> Future[Completion]:
        """Queue one request into the running batch; resolves to its completion.

        ``on_text``, if given, receives the completion's text piece by piece,
        and ``on_logprob`` each token's log probability entry, when asked for.
        """
        return self._batcher.submit(request, on_text, on_logprob)

    def probe(self, longest_request_s: float = 0.0) -> None:
        """Raise unless this engine can still serve: the decode loop runs, has
        not been on one turn for :data:`STALLED_AFTER_S` or
        ``longest_request_s`` (what a request may take), whichever is longer,
        and a one-token forward pass gives finite logits.

        The pass runs on the caller's thread, outside the batch, so a health
        check neither waits for nor shows up in the batching counters.
        """
        if not self._batcher.alive:
            raise RuntimeError("the decode loop has stopped")
        if (stalled := self._batcher.stalled_s()) > max(STALLED_AFTER_S, longest_request_s):
            raise RuntimeError(f"the decode loop has been on one step for {stalled:.0f} s")
        token = torch.tensor([[self.tokenizer.eos_token_id or 0]], device=self.device)
        with torch.inference_mode():
            logits = self.model(input_ids=token).logits
        if not torch.isfinite(logits).all():
            raise RuntimeError(not_finite(next(self.model.parameters()).dtype))

    def between_steps(self, pieces: Sequence[Callable[[], None]]) -> Future[None]:
        """Run ``pieces`` on the decode thread, one between two decode steps
        (all at once when idle); see :meth:`ContinuousBatcher.between_steps`."""
        return self._batcher.between_steps(pieces)

    def prompt_logprobs(
        self, prompt: str | tuple[int, ...], top: int
    ) -> Future[tuple[TokenLogprob, ...]]:
        """Each prompt token's log probability given the tokens before it
        (None for the first), with ``top`` alternatives: how evaluation
        harnesses score a text (``echo`` with ``logprobs``).

        The pass runs on the decode thread, where the model is free, in
        chunks of :data:`SCORING_CHUNK` tokens through a cache of its own: a
        long prompt's logits never sit in memory at once, and each chunk is a
        piece of its own between two decode steps, so the sequences decoding
        meanwhile wait for one chunk at a time, not for the whole prompt."""
        ids = prompt_token_ids(self.tokenizer, prompt)
        scored: Future[tuple[TokenLogprob, ...]] = Future()
        entries = [TokenLogprob(self.tokenizer.decode([ids[0]]), None)]
        caches: list[Any] = []  # the scoring pass's own, made on the decode thread

        def score_from(start: int) -> Callable[[], None]:
            def score() -> None:
                if scored.done():  # its caller gave up: the chunks left are skipped
                    return
                with torch.inference_mode():
                    if not caches:
                        caches.append(self.model.new_cache())
                    entries.extend(self._score_chunk(ids, start, top, caches[0]))

            return score

        def finish() -> None:
            if not scored.done():
                scored.set_result(tuple(entries))

        def failed(done: Future[None]) -> None:
            if done.exception() is not None and not scored.done():
                scored.set_exception(done.exception())  # type: ignore[arg-type]

        pieces = [score_from(start) for start in range(0, len(ids) - 1, SCORING_CHUNK)]
        self._batcher.between_steps([*pieces, finish], wake=True).add_done_callback(failed)
        return scored

    def _score_chunk(self, ids: list[int], start: int, top: int, cache: Any) -> list[TokenLogprob]:
        """The entries of the tokens after ``ids[start : start + SCORING_CHUNK]``,
        from one pass over that chunk, which extends ``cache``."""
        text = self.tokenizer.decode
        chunk = ids[start : start + SCORING_CHUNK]
        inputs = torch.tensor([chunk], device=self.device)
        mask = torch.ones(1, start + len(chunk), dtype=torch.long, device=self.device)
        logits = self.model(input_ids=inputs, attention_mask=mask, cache=cache).logits[0]
        # Position i predicts token start + i + 1.
        targets = ids[start + 1 : start + 1 + len(chunk)]
        values = torch.log_softmax(logits[: len(targets)].float(), dim=-1)
        picked = torch.tensor(targets, device=self.device)[:, None]
        chosen = values.gather(1, picked)[:, 0].tolist()
        best = values.topk(top) if top else None
        entries = []
        for i, token in enumerate(targets):
            alternatives = ()
            if best is not None:
                pairs = zip(best.indices[i].tolist(), best.values[i].tolist(), strict=True)
                alternatives = tuple((text([t]), v) for t, v in pairs)
            entries.append(TokenLogprob(text([token]), chosen[i], alternatives))
        return entries

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Completion]:
        """Complete ``requests`` (blocking); completions hold only the new text."""
        with self.together():
            futures = [self.submit(request) for request in requests]
        return [future.result() for future in futures]

    @property
    def stats(self) -> BatchStats:
        return self._batcher.stats

    def batch_load(self) -> BatchLoad:
        return self._batcher.batch_load()


def describe(model: Decoder, fallback_reason: str | None = None) -> EngineInfo:
    """What runs ``model``: read from the model itself, so it cannot drift
    from what was loaded."""
    kit = not isinstance(model, TransformersDecoder)
    weight = next(model.parameters())
    quantized = [m for m in model.modules() if isinstance(m, GgufLinear | Int8Linear)]
    kinds = sorted({m.kind for m in quantized})
    dtype = str(weight.dtype).removeprefix("torch.")
    weights = " + ".join(kinds) + " blocks" if kinds else dtype
    if any(isinstance(m, Int8Linear) for m in quantized):
        weights += ", int8 activations"
    gpu_kernels = None
    if kit and weight.device.type == "cuda":
        serving = {
            "paged_attention": getattr(model, "decode_kernel", None) is not None,
            "fused_layer_ops": type(getattr(model, "ops", LayerOps())) is not LayerOps,
        }
        gpu_kernels = tuple(name for name, serves in serving.items() if serves)
    return EngineInfo(
        implementation="kit-decoder" if kit else "transformers",
        architecture=str(getattr(model.config, "family" if kit else "model_type", "unknown")),
        dtype=dtype,
        device=weight.device.type,
        weights=weights,
        fallback_reason=fallback_reason,
        gpu_kernels=gpu_kernels,
    )


def _transformers_model(source: str, dtype: torch.dtype, device: str) -> Any:
    from transformers import AutoModelForCausalLM

    return TransformersDecoder(AutoModelForCausalLM.from_pretrained(source, dtype=dtype).to(device))


def _import_model_code(source: str) -> None:
    """Import the modelling module for ``source``'s architecture now, so that
    the time Python spends on it counts as imports rather than weights."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    with contextlib.suppress(OSError, ValueError, KeyError):
        MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(source))]


def _context_length(config: Any) -> int:
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def _eos_token_ids(model: Any, tokenizer: Any) -> set[int]:
    """The tokens that end a completion: the model's, else the tokenizer's,
    else none (a base model may have none; it then stops at its limit)."""
    ids = model.generation_config.eos_token_id
    if ids is None:
        ids = tokenizer.eos_token_id
    if ids is None:
        return set()
    return set(ids) if isinstance(ids, list) else {ids}
