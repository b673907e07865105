"""Which checkpoints the kit's own decoder runs, decided from ``config.json`` alone.

The engine chooses between the kit's Llama and transformers before it reads a
weight, so that choice lives here, apart from the model: :func:`llama_config`
either returns the few switches the forward pass needs or raises
:class:`UnsupportedCheckpoint` saying why (another architecture, another RoPE
scaling, per-layer sliding windows, quantized weights), and the engine then
loads the checkpoint through transformers (``helpers/engine/engine.py``)
rather than have the kit's decoder half-support it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
"""``model_type`` values the kit's decoder runs."""
_DEFAULTS: dict[str, dict[str, Any]] = {
    "mistral": {"sliding_window": 4096},
    "qwen3": {"head_dim": 128},
}
"""transformers' defaults, per family, for fields a ``config.json`` may leave out."""


class UnsupportedCheckpoint(ValueError):
    """A checkpoint the kit's decoder does not run; the message says why."""


@dataclass(frozen=True)
class RopeScaling:
    """How the rotary frequencies are stretched for long contexts.

    ``default`` leaves them; ``linear`` divides them all by ``factor``;
    ``llama3`` divides the low ones, keeps the high ones and blends between,
    as Llama 3.1 and later are trained.
    """

    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class LlamaConfig:
    """The fields of a checkpoint's ``config.json`` that the forward pass uses.

    The families differ from Llama by a few switches, each a field here:

    - Llama 1, 2 and 3.x (SmolLM2 and TinyLlama included): RoPE plain,
      ``linear`` or ``llama3``-scaled; embeddings tied or not;
    - Mistral: attention over a sliding window of recent tokens;
    - Qwen2 and Qwen2.5: a bias on the q, k and v projections;
    - Qwen3: an RMSNorm over each query and key head before the rotation.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    family: str = "llama"
    rope_scaling: RopeScaling = RopeScaling()
    qkv_bias: bool = False
    output_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    """Each token attends to this many latest positions, itself included."""


def llama_config(directory: Path) -> LlamaConfig:
    """The config of a checkpoint the kit's decoder can run.

    Raises :class:`UnsupportedCheckpoint` with the reason for anything else,
    which the engine then leaves to transformers.
    """
    config_file = directory / "config.json"
    if not config_file.is_file() or not any(directory.glob("*.safetensors")):
        raise UnsupportedCheckpoint("not a directory of config.json and safetensors weights")
    raw = json.loads(config_file.read_text())
    family = raw.get("model_type")
    if family not in FAMILIES:
        raise UnsupportedCheckpoint(f"model_type {family!r} is not one of {', '.join(FAMILIES)}")
    raw = _DEFAULTS.get(family, {}) | raw
    if raw.get("hidden_act", "silu") != "silu":
        raise UnsupportedCheckpoint(f"hidden_act {raw['hidden_act']!r} is not silu")
    if "quantization_config" in raw:
        raise UnsupportedCheckpoint("its weights are quantized")
    heads = raw["num_attention_heads"]
    bias = raw.get("attention_bias", False)
    return LlamaConfig(
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"],
        num_hidden_layers=raw["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=raw.get("num_key_value_heads") or heads,
        head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        rope_theta=_rope_parameters(raw).get("rope_theta", raw.get("rope_theta", 10000.0)),
        max_position_embeddings=raw.get("max_position_embeddings", 2048),
        tie_word_embeddings=raw.get("tie_word_embeddings", False),
        family=family,
        rope_scaling=_rope_scaling(raw),
        qkv_bias=True if family == "qwen2" else bias,
        output_bias=False if family == "qwen2" else bias,
        mlp_bias=raw.get("mlp_bias", False),
        qk_norm=family == "qwen3",
        sliding_window=_sliding_window(raw, family),
    )


def _rope_parameters(raw: dict[str, Any]) -> dict[str, Any]:
    """RoPE's settings: ``rope_parameters`` as transformers 5 writes them,
    ``rope_scaling`` as older checkpoints do."""
    return raw.get("rope_parameters") or raw.get("rope_scaling") or {}


def _rope_scaling(raw: dict[str, Any]) -> RopeScaling:
    rope = _rope_parameters(raw)
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return RopeScaling()
    if kind == "linear":
        return RopeScaling(kind, float(rope["factor"]))
    if kind == "llama3":
        return RopeScaling(
            kind,
            float(rope["factor"]),
            float(rope["low_freq_factor"]),
            float(rope["high_freq_factor"]),
            int(rope["original_max_position_embeddings"]),
        )
    raise UnsupportedCheckpoint(f"RoPE scaling {kind!r} is not default, linear or llama3")


def _sliding_window(raw: dict[str, Any], family: str) -> int | None:
    """Mistral slides every layer's window; Qwen's option slides only some
    layers, which the kit's decoder leaves to transformers."""
    if family == "mistral":
        return raw.get("sliding_window")
    if family in ("qwen2", "qwen3") and raw.get("use_sliding_window"):
        first_sliding = raw.get("max_window_layers", raw["num_hidden_layers"])
        types = raw.get("layer_types") or [
            "sliding_attention" if i >= first_sliding else "full_attention"
            for i in range(raw["num_hidden_layers"])
        ]
        if "sliding_attention" in types:
            raise UnsupportedCheckpoint("some of its layers attend over a sliding window")
    return None
