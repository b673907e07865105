"""A Llama-family decoder in plain torch: what replicas run for the popular
small instruct models.

Why not transformers' own: importing its modelling code pulls in torch's
compiler and distributed-tensor packages, seconds of every cold start on a
small machine (``bench/RESULTS.md``), for a model whose forward pass is a page
of arithmetic. The families below differ from Llama by a few switches, each a
field of :class:`LlamaConfig`:

- Llama 1, 2 and 3.x (SmolLM2 and TinyLlama included): RoPE plain, ``linear``
  or ``llama3``-scaled; embeddings tied or not;
- Mistral: attention over a sliding window of recent tokens;
- Qwen2 and Qwen2.5: a bias on the q, k and v projections;
- Qwen3: an RMSNorm over each query and key head before the rotation.

:func:`llama_config` reads a checkpoint's ``config.json`` and raises
:class:`UnsupportedCheckpoint`, saying why, for anything else (another
architecture, another RoPE scaling, per-layer sliding windows, quantized
weights); the engine then loads it through transformers
(``helpers/engine/engine.py``) rather than half-supporting it here.

It accepts the call the continuous batcher makes of a transformers model
(``input_ids``, ``attention_mask``, ``position_ids``, ``cache``,
``logits_to_keep``) and its cache keeps the same per-layer ``keys`` and
``values`` tensors, so the batcher drives either model the same way. The
arithmetic follows transformers' step for step (RMSNorm in fp32,
rotate-half RoPE, scaled dot-product attention); model tests hold every
family to transformers' logits on small random checkpoints.

In fp16 the residual stream (the running sum every layer adds to) stays in
fp32: Qwen2 checkpoints are known to grow it past fp16's largest number,
after which every token is NaN; each layer still computes in fp16.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from helpers.engine import gguf_linear

logger = logging.getLogger(__name__)

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
"""``model_type`` values this module runs."""
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
    """The fields of a checkpoint's ``config.json`` that the forward pass uses."""

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


@dataclass(frozen=True)
class GenerationDefaults:
    """What the engine reads from ``generation_config.json``: when to stop."""

    eos_token_id: int | list[int] | None


@dataclass
class ModelOutput:
    logits: torch.Tensor


def llama_config(directory: Path) -> LlamaConfig:
    """The config of a checkpoint this module can run.

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
    layers, which this module leaves to transformers."""
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


def load_llama(
    directory: Path, config: LlamaConfig, dtype: torch.dtype, device: str, gguf_blocks: bool = True
) -> Llama:
    """The checkpoint in ``directory``, read straight onto ``device``.

    Where the directory holds GGUF blocks (the embedded model's copy) and
    this CPU runs their kernels, the linear layers keep those blocks instead
    of fp32 weights (:mod:`helpers.engine.gguf_linear`), unless ``gguf_blocks`` is
    False; their fp32 weights are then never read. On a GPU the projections
    that read the same input are merged (:func:`merge_projections`).
    """
    blocks: dict[str, torch.Tensor] = {}
    blocks_file = directory / gguf_linear.BLOCKS_FILE
    if (
        gguf_blocks
        and blocks_file.is_file()
        and (device, dtype) == ("cpu", torch.float32)
        and gguf_linear.kernels() is not None
    ):
        blocks = load_file(blocks_file)
    replaced = {name.rsplit(".", 1)[0] + ".weight" for name in blocks}
    state: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, framework="pt", device=device) as checkpoint:
            names = set(checkpoint.keys()) - replaced
            state |= {name: checkpoint.get_tensor(name) for name in names}
    state = {name: tensor.to(dtype) for name, tensor in state.items()}
    if config.tie_word_embeddings and "lm_head.weight" not in replaced:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model = build_llama(config, state | blocks, _eos_token_id(directory))
    del state, blocks  # the model holds the weights: merging frees each layer's as it goes
    if model.device.type == "cuda":
        merge_projections(model)
        # The separate weights' blocks, which no larger tensor can reuse, go back
        # to the GPU: a replica sharing it (NUM_GPUS_PER_REPLICA=0.5) may need them.
        torch.cuda.empty_cache()
    return model


def build_llama(
    config: LlamaConfig, state: dict[str, torch.Tensor], eos_token_id: int | list[int] | None
) -> Llama:
    """A model around ``state``'s tensors, used where they lie. It is built on
    the meta device first, so no memory or time goes into initial weights
    about to be replaced. Linear layers whose GGUF blocks are in ``state``
    become :class:`~helpers.engine.gguf_linear.GgufLinear`."""
    with torch.device("meta"):
        model = Llama(config, eos_token_id)
        gguf_linear.use_blocks(model, state)
    model.load_state_dict(state, strict=True, assign=True)
    model.inv_freq = rope_inverse_frequencies(config, model.device)
    model.ops = layer_ops(config, model.device, model.model.embed_tokens.weight.dtype)
    return model.eval()


def merge_projections(model: Llama) -> None:
    """Each layer's q, k and v projections as one matrix product, and its
    gate and up projections as another: on a GPU, where a small model's step
    is bound by its launches, three fewer a layer, each reading its input
    once. The CPU keeps them apart, where its linear layers are GGUF blocks
    or prepacked for oneDNN weight by weight (:mod:`helpers.engine.gguf_linear`,
    :mod:`helpers.engine.cpu_linear`)."""
    for layer in model.model.layers:
        attention, mlp = layer.self_attn, layer.mlp
        attention.qkv_proj = _stacked(attention.q_proj, attention.k_proj, attention.v_proj)
        mlp.gate_up_proj = _stacked(mlp.gate_proj, mlp.up_proj)
        del attention.q_proj, attention.k_proj, attention.v_proj, mlp.gate_proj, mlp.up_proj


def _stacked(*linears: nn.Linear) -> nn.Linear:
    """One linear layer whose outputs are ``linears``' outputs, in order."""
    weight = torch.cat([linear.weight for linear in linears])
    with torch.device("meta"):
        stacked = nn.Linear(weight.shape[1], weight.shape[0], bias=linears[0].bias is not None)
    stacked.weight = nn.Parameter(weight, requires_grad=False)
    if stacked.bias is not None:
        bias = torch.cat([linear.bias for linear in linears])
        stacked.bias = nn.Parameter(bias, requires_grad=False)
    return stacked


def _eos_token_id(directory: Path) -> int | list[int] | None:
    for name in ("generation_config.json", "config.json"):
        file = directory / name
        if file.is_file() and (ids := json.loads(file.read_text()).get("eos_token_id")):
            return ids
    return None


def rope_inverse_frequencies(config: LlamaConfig, device: str | torch.device) -> torch.Tensor:
    """The rotation speed of each pair of a head's dimensions, scaled as the
    checkpoint was trained (transformers' ``rope_init_fn`` for each kind)."""
    exponents = torch.arange(0, config.head_dim, 2, dtype=torch.float, device=device)
    frequencies = 1.0 / (config.rope_theta ** (exponents / config.head_dim))
    scaling = config.rope_scaling
    if scaling.kind == "linear":
        return frequencies / scaling.factor
    if scaling.kind == "llama3":
        # Wavelengths longer than the original context / low_freq_factor are
        # slowed by ``factor``, shorter than it / high_freq_factor kept, and
        # those between blended by where they lie.
        context = scaling.original_max_position_embeddings
        wavelengths = 2 * math.pi / frequencies
        slowed = torch.where(
            wavelengths > context / scaling.low_freq_factor,
            frequencies / scaling.factor,
            frequencies,
        )
        blend = (context / wavelengths - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor
        )
        blended = (1 - blend) * slowed / scaling.factor + blend * slowed
        between = (wavelengths >= context / scaling.high_freq_factor) & (
            wavelengths <= context / scaling.low_freq_factor
        )
        return torch.where(between, blended, slowed)
    return frequencies


class LayerCache:
    """One layer's keys and values, ``[batch, kv_heads, length, head_dim]``."""

    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def attend(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        mask: torch.Tensor | None,
        scale: float,
    ) -> torch.Tensor:
        """Append the new tokens' keys and values; their queries' attention
        over every column, under ``mask``."""
        if self.keys is None or self.values is None:
            self.keys, self.values = keys, values
        else:
            self.keys = torch.cat([self.keys, keys], dim=-2)
            self.values = torch.cat([self.values, values], dim=-2)
        return F.scaled_dot_product_attention(
            queries, self.keys, self.values, attn_mask=mask, scale=scale, enable_gqa=True
        )


class KVCache:
    """Keys and values that grow by one column per step, rows left-padded to a
    common length: what the batcher's CPU path keeps (no memory reserved
    ahead, no work spent on columns nobody reads)."""

    def __init__(self, layers: int) -> None:
        self.layers = [LayerCache() for _ in range(layers)]

    @property
    def length(self) -> int:
        keys = self.layers[0].keys
        return 0 if keys is None else keys.shape[-2]

    def mask(
        self,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor,
        new: int,
        window: int | None,
    ) -> torch.Tensor | None:
        """None on CPU where every row's one new token sees every key (no
        padding, within the window): attention then skips applying a mask,
        the same result to the bit for less work a layer. A GPU keeps its
        mask: the check would wait for the device, and attention there may
        pick another kernel without one."""
        if (
            new == 1
            and position_ids.device.type == "cpu"
            and (window is None or self.length < window)
            and (attention_mask is None or bool(attention_mask.all()))
        ):
            return None
        if attention_mask is None:
            batch = position_ids.shape[0]
            attention_mask = torch.ones(
                batch, self.length + new, dtype=torch.long, device=position_ids.device
            )
        return _attention_mask(attention_mask, new, window)


PAGE_SIZE = 16
"""Positions one page of a :class:`PagedCache` holds."""


def pages_for(positions: int) -> int:
    """Pages that hold ``positions`` positions."""
    return -(-positions // PAGE_SIZE)


class PagedLayer:
    """One layer's pages of a :class:`PagedCache`, ``[pages, PAGE_SIZE, kv_heads, head_dim]``."""

    def __init__(self, owner: PagedCache, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.owner, self.keys, self.values = owner, keys, values

    def attend(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        mask: torch.Tensor | None,
        scale: float,
    ) -> torch.Tensor:
        """Write the new tokens into their pages, then attend: in place, with
        the cache's decode kernel, for a pass of one new token a row
        (:meth:`PagedCache.select`); else over the rows' pages gathered in
        order, under ``mask``."""
        owner = self.owner
        # [batch, new] page and offset indices around all heads: the indexed
        # view is [batch, new, heads, head_dim].
        self.keys[owner.write_pages, owner.write_offsets] = keys.transpose(1, 2)
        self.values[owner.write_pages, owner.write_offsets] = values.transpose(1, 2)
        if owner.ends is not None:
            return owner.decode_kernel(
                queries, self.keys, self.values, owner.read_pages, owner.ends, scale, owner.window
            )
        keys, values = (
            _gathered(self.keys, owner.read_pages),
            _gathered(self.values, owner.read_pages),
        )
        return F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=mask, scale=scale, enable_gqa=True
        )


def _gathered(pool: torch.Tensor, pages: torch.Tensor) -> torch.Tensor:
    """``[batch, heads, width, head_dim]`` from a layer's pages and each row's
    page numbers, ``[batch, width / PAGE_SIZE]``."""
    rows = pool[pages]  # [batch, pages, PAGE_SIZE, heads, head_dim], one copy
    return rows.view(pages.shape[0], -1, *pool.shape[2:]).transpose(1, 2)


DecodeKernel = Callable[..., torch.Tensor]
""":func:`helpers.engine.paged_attention.decode_attention`'s signature."""


def paged_decode_kernel(
    config: LlamaConfig, device: torch.device, dtype: torch.dtype
) -> DecodeKernel | None:
    """The kernel that reads a decode step's pages in place
    (:mod:`helpers.engine.paged_attention`), where it runs and agrees with
    torch's attention for this model's heads. Elsewhere None, and the pages
    are gathered for torch's attention."""
    module = _checked_triton_module(
        "paged_attention",
        device,
        dtype,
        lambda kernels: kernels.problem_on(
            device, dtype, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        ),
        "decode steps gather the KV cache's pages for attention",
    )
    return None if module is None else module.decode_attention


def layer_ops(config: LlamaConfig, device: torch.device, dtype: torch.dtype) -> LayerOps:
    """A layer's steps between its matrix products as one kernel each
    (:mod:`helpers.engine.fused_layer_ops`), where they run and agree with
    torch's operations for this model's sizes; elsewhere torch's."""
    module = _checked_triton_module(
        "fused_layer_ops",
        device,
        dtype,
        lambda kernels: kernels.problem_on(device, dtype, config),
        "each layer runs torch's operations between its matrix products",
    )
    return LayerOps() if module is None else module.FUSED


def _checked_triton_module(
    name: str,
    device: torch.device,
    dtype: torch.dtype,
    problem: Callable[[Any], str | None],
    fallback: str,
) -> Any:
    """``helpers.engine.<name>``, a module of Triton kernels, where they can
    serve: on a GPU, with the Triton that torch's CUDA builds bring, and
    where ``problem`` (the module's own check, compiling them for this
    model) finds none. Elsewhere None, with a warning that gives the reason
    and the ``fallback`` taken; off a GPU, silently, before importing it."""
    if device.type != "cuda":
        return None
    if dtype != torch.float16 and torch.cuda.get_device_capability(device) < (8, 0):
        # Triton's matrix units there take fp16 only; a failed compile can abort the process.
        logger.warning("Triton's kernels here need float16 before Ampere: %s", fallback)
        return None
    try:
        module = importlib.import_module(f"helpers.engine.{name}")
    except ImportError:
        logger.warning("no Triton: %s", fallback)
        return None
    found = problem(module)
    if found is not None:
        logger.warning("%s failed its check (%s): %s", name, found, fallback)
        return None
    return module


class PagedCache:
    """Keys and values in pages of ``PAGE_SIZE`` positions shared by every
    sequence; each sequence owns a row ("slot") of a block table that lists
    its pages, so its token at position p lives at offset p % PAGE_SIZE of
    page ``table[slot, p // PAGE_SIZE]``.

    Why: on a GPU a decode step of a small model is launch-bound (a thousand
    small kernels), and replaying it as one CUDA graph needs every tensor's
    shape and address fixed in advance. The pages and the table keep both
    fixed while each sequence holds only the pages its own length needs: a
    cache of one row per sequence, each as long as the longest, would
    reserve the worst case for all of them. A pass of one new token a row (a
    decode step) reads each row's pages in place, up to its own position,
    where a GPU runs the kernel of :mod:`helpers.engine.paged_attention`
    (``decode_kernel``); otherwise, and in prefills, each row's pages are
    gathered in order and read under a mask of the positions up to each
    token's own. Either way the caller passes no attention mask.

    Page 0 is scratch. A table's unused entries point at it, and so does its
    last column: a padding token is placed at ``scratch_position``, whose
    write lands there. Whatever it holds is read only under the mask.

    Before each forward pass the caller names its rows, their tokens'
    positions and the columns attention reads (:meth:`select`).
    """

    def __init__(
        self,
        config: LlamaConfig,
        slots: int,
        pages: int,
        max_positions: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.dtype, self.device = dtype, device
        self.window = config.sliding_window
        self.decode_kernel = paged_decode_kernel(config, device, dtype)
        self.ends: torch.Tensor | None = None  # where the kernel stops, row by row
        self.page_shape = (PAGE_SIZE, config.num_key_value_heads, config.head_dim)
        self.layers = [
            PagedLayer(self, *self._new_pool(pages)) for _ in range(config.num_hidden_layers)
        ]
        columns = pages_for(max_positions)
        self.scratch_position = columns * PAGE_SIZE
        self.table = torch.zeros(slots, columns + 1, dtype=torch.long, device=device)
        self.free = list(range(1, pages + 1))
        self.owned: dict[int, list[int]] = {}  # slot -> its pages, in order

    def _new_pool(self, pages: int) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (pages + 1, *self.page_shape)
        return (
            torch.zeros(shape, dtype=self.dtype, device=self.device),
            torch.zeros(shape, dtype=self.dtype, device=self.device),
        )

    @property
    def pages(self) -> int:
        """Pages for sequences, scratch not counted."""
        return self.layers[0].keys.shape[0] - 1

    def select(self, rows: torch.Tensor, positions: torch.Tensor, width: int) -> None:
        """Set the next pass: its ``rows`` (slots), each token's position
        (``[rows, new]``) and the columns attention reads, a multiple of
        ``PAGE_SIZE``. Tensor arithmetic only, so a CUDA graph captures it."""
        self.ends = None
        if positions.shape[1] == 1 and self.decode_kernel is not None:
            # The kernel reads this pass's pages: each row up to its new token,
            # or, for an idle row (at scratch), scratch's first column, which
            # keeps its unused output finite.
            last = positions[:, 0]
            self.ends = torch.where(last >= self.scratch_position, 1, last + 1).int()
        self.write_pages = self.table[rows[:, None], positions // PAGE_SIZE]
        self.write_offsets = positions % PAGE_SIZE
        self.read_pages = self.table[rows, : width // PAGE_SIZE]
        self.width = width

    def assign(self, slots: list[int], positions: list[int]) -> None:
        """Give each slot zeroed pages for that many positions. Zeroed, as the
        mask gives a column weight zero, but zero times a NaN left by the
        last owner is NaN."""
        table = torch.zeros(len(slots), self.table.shape[1], dtype=torch.long)
        taken: list[int] = []
        for row, (slot, count) in enumerate(zip(slots, positions, strict=True)):
            needed = pages_for(count)
            if needed > len(self.free):
                raise ValueError(f"{count} positions need {needed} pages; {len(self.free)} free")
            self.owned[slot], self.free = self.free[:needed], self.free[needed:]
            table[row, :needed] = torch.tensor(self.owned[slot])
            taken += self.owned[slot]
        self.table[torch.tensor(slots, device=self.device)] = table.to(self.device)
        pages = torch.tensor(taken, device=self.device)
        for layer in self.layers:
            layer.keys[pages] = 0
            layer.values[pages] = 0

    def keep(self, slots: list[int]) -> None:
        """Keep these slots' sequences, renumbered 0, 1, ... in this order, and
        return every other slot's pages; the table's other rows point at
        scratch again.

        Why renumber: a decode step runs over the table's first rows, as many
        as the last busy one needs, so the sequences left after others end
        are packed at the front and the step shrinks with them. A sequence
        moves by its row of the table; its pages stay where they are."""
        busy = max(self.owned, default=-1) + 1
        kept = set(slots)
        for slot in [slot for slot in self.owned if slot not in kept]:
            self.free += self.owned.pop(slot)
        self.owned = {row: self.owned[slot] for row, slot in enumerate(slots)}
        if slots != list(range(len(slots))):
            self.table[: len(slots)] = self.table[torch.tensor(slots, device=self.device)]
        self.table[len(slots) : busy] = 0

    def copy(self, source: int, target: int, positions: int) -> None:
        """Copy the first ``positions`` positions of one slot's pages to another's."""
        count = pages_for(positions)
        source_pages = torch.tensor(self.owned[source][:count], device=self.device)
        target_pages = torch.tensor(self.owned[target][:count], device=self.device)
        for layer in self.layers:
            layer.keys[target_pages] = layer.keys[source_pages]
            layer.values[target_pages] = layer.values[source_pages]

    def grow(self, pages: int) -> None:
        """Room for ``pages`` pages in all, their contents kept. The layers'
        tensors move: CUDA graphs captured over the old ones must go."""
        kept = self.pages + 1
        for layer in self.layers:
            keys, values = self._new_pool(pages)
            keys[:kept], values[:kept] = layer.keys, layer.values
            layer.keys, layer.values = keys, values
        self.free += list(range(kept, pages + 1))

    def mask(
        self,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor,
        new: int,
        window: int | None,
    ) -> torch.Tensor | None:
        """``[batch, 1, new, width]``: columns up to each token's own position
        and within ``window`` of it. A padding token (at ``scratch_position``)
        sees every column, so its row of attention is never empty: an empty
        row gives NaN, which its write would leave in the scratch page that
        every row reads under its mask (and zero times NaN is NaN).

        None where the decode kernel reads this pass's pages itself (one new
        token a row, :meth:`select`)."""
        if self.ends is not None:
            return None
        columns = torch.arange(self.width, device=position_ids.device)
        positions = position_ids[:, :, None]
        allowed = columns <= positions
        if window is not None:
            allowed &= (columns > positions - window) | (positions >= self.scratch_position)
        return allowed[:, None]


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """In the weight's dtype, whatever ``x``'s: an fp32 residual stream
        (see the module's docstring) comes out ready for fp16 layers."""
        x = x.float()
        x = x * x.pow(2).mean(-1, keepdim=True).add_(self.eps).rsqrt_()
        weight = self.weight
        return weight * (x if x.dtype is weight.dtype else x.to(weight.dtype))


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """RoPE's ``x * cos + rotate_half(x) * sin``, where ``rotate_half(x)`` is
    ``x``'s halves swapped with the first negated. The sign lives in
    ``signed_sin`` (:meth:`Llama._rope`) so the swap is one ``roll``: the same
    products to the bit, in fewer operations a layer."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


class LayerOps:
    """A layer's steps between its matrix products, in torch's operations:
    what a model runs on CPU, and on a GPU where the kernels of
    :mod:`helpers.engine.fused_layer_ops` (a subclass) cannot take their
    place (:func:`layer_ops`)."""

    def norm(self, x: torch.Tensor, norm: RMSNorm) -> torch.Tensor:
        return norm(x)

    def add_norm(
        self, x: torch.Tensor, delta: torch.Tensor, norm: RMSNorm
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual stream ``x`` with a layer's output ``delta`` added, and
        that sum normalised for the layer after: one step, so a GPU can run
        the two as one kernel."""
        x = x + delta
        return x, self.norm(x, norm)

    def rotate(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        cos: torch.Tensor,
        signed_sin: torch.Tensor,
        norms: tuple[RMSNorm, RMSNorm] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Both rotated by RoPE (:func:`_rotate`), each head normalised
        first where there are ``norms`` (Qwen3's, of queries and of keys)."""
        if norms is not None:
            queries, keys = norms[0](queries), norms[1](keys)
        return _rotate(queries, cos, signed_sin), _rotate(keys, cos, signed_sin)

    def silu_mul(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return F.silu(gate) * up


@dataclass(frozen=True)
class Segment:
    """Rows that share a cache and a token count, for one forward pass.

    A decode step is one segment (one new token per row); so is a prefill
    (each prompt's tokens, left-padded). :meth:`Llama.forward_segments` runs
    several in one pass: every linear layer, where nearly all of a CPU
    forward pass goes, reads its weights once for all their tokens, and
    only attention runs per segment, each against its own cache.
    """

    input_ids: torch.Tensor
    cache: KVCache | PagedCache
    position_ids: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    logits_to_keep: int = 0
    """Logits for this many last tokens of each row; 0 for every token."""


@dataclass(frozen=True)
class _Rows:
    """What attention needs of one segment: its shape, rotation and mask."""

    batch: int
    length: int
    rope: tuple[torch.Tensor, torch.Tensor]
    mask: torch.Tensor | None

    @property
    def tokens(self) -> int:
        return self.batch * self.length


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        heads, kv_heads, dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        bias = config.qkv_bias
        self.head_dim = dim
        self.q_proj = nn.Linear(config.hidden_size, heads * dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_heads * dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_heads * dim, bias=bias)
        self.widths = (heads * dim, kv_heads * dim, kv_heads * dim)
        self.qkv_proj: nn.Linear | None = None  # the three in one (merge_projections)
        self.o_proj = nn.Linear(heads * dim, config.hidden_size, bias=config.output_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(dim, config.rms_norm_eps)
        self.qk_norm = config.qk_norm

    def projections(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Queries, keys and values of ``x``: one matrix product where they
        are merged, three where not."""
        if self.qkv_proj is not None:
            return self.qkv_proj(x).split(self.widths, dim=-1)
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(
        self,
        x: torch.Tensor,
        segments: list[_Rows],
        caches: list[LayerCache | PagedLayer],
        ops: LayerOps,
    ) -> torch.Tensor:
        """``x`` is every segment's tokens packed, ``[tokens, hidden]``."""
        queries, keys, values = self.projections(x)
        norms = (self.q_norm, self.k_norm) if self.qk_norm else None
        outputs, start = [], 0
        for rows, cache in zip(segments, caches, strict=True):
            end = start + rows.tokens
            shape = (rows.batch, rows.length, -1, self.head_dim)
            q, k, v = (
                part[start:end].view(shape).transpose(1, 2) for part in (queries, keys, values)
            )
            q, k = ops.rotate(q, k, *rows.rope, norms)
            out = cache.attend(q, k, v, rows.mask, self.head_dim**-0.5)
            outputs.append(out.transpose(1, 2).reshape(rows.tokens, -1))
            start = end
        return self.o_proj(outputs[0] if len(outputs) == 1 else torch.cat(outputs))


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        size, inner, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(size, inner, bias=bias)
        self.up_proj = nn.Linear(size, inner, bias=bias)
        self.gate_up_proj: nn.Linear | None = None  # the two in one (merge_projections)
        self.down_proj = nn.Linear(inner, size, bias=bias)

    def forward(self, x: torch.Tensor, ops: LayerOps) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(ops.silu_mul(gate, up))


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        delta: torch.Tensor | None,
        segments: list[_Rows],
        caches: list[LayerCache | PagedLayer],
        ops: LayerOps,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual stream ``x`` and the layer before's output ``delta``,
        not yet added (None before the first layer); returns them for the
        layer after. Each sum is left to the norm that follows it, so
        ``ops`` can do both in one step."""
        if delta is None:
            normed = ops.norm(x, self.input_layernorm)
        else:
            x, normed = ops.add_norm(x, delta, self.input_layernorm)
        delta = self.self_attn(normed, segments, caches, ops)
        x, normed = ops.add_norm(x, delta, self.post_attention_layernorm)
        return x, self.mlp(normed, ops)


class Decoder(nn.Module):
    """Named as in the checkpoints (``model.layers.0.self_attn.q_proj``...), so
    their weights load by name."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        # An explicit weight skips the random init, which on the meta device
        # loads torch's meta kernels for normal_: a one-off cost in every cold start.
        shape = (config.vocab_size, config.hidden_size)
        self.embed_tokens = nn.Embedding(*shape, _weight=torch.empty(shape))
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Llama(nn.Module):
    def __init__(self, config: LlamaConfig, eos_token_id: int | list[int] | None = None) -> None:
        super().__init__()
        self.config = config
        self.generation_config = GenerationDefaults(eos_token_id)
        self.model = Decoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inverse_frequencies(config, "cpu"), persistent=False)
        self.ops = LayerOps()
        """Torch's operations, or a GPU's kernels for them (:func:`layer_ops`)."""

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def new_cache(self) -> KVCache:
        return KVCache(self.config.num_hidden_layers)

    def new_paged_cache(self, slots: int, pages: int, max_positions: int) -> PagedCache:
        weight = self.model.embed_tokens.weight
        return PagedCache(self.config, slots, pages, max_positions, weight.dtype, weight.device)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | PagedCache | None = None,
        logits_to_keep: int = 0,
    ) -> ModelOutput:
        """Logits for ``input_ids`` given the ``cache`` of the tokens before them.

        ``attention_mask`` covers the cached tokens and the new ones (0 marks
        left padding); ``position_ids`` count each row's real tokens only.
        """
        cache = cache if cache is not None else self.new_cache()
        segment = Segment(input_ids, cache, position_ids, attention_mask, logits_to_keep)
        return ModelOutput(self.forward_segments([segment])[0])

    def forward_segments(self, segments: list[Segment]) -> list[torch.Tensor]:
        """Each segment's logits, ``[batch, kept tokens, vocab]``, from one pass."""
        rows, hidden, kept = [], [], []
        for segment in segments:
            batch, new = segment.input_ids.shape
            positions = segment.position_ids
            if positions is None:
                past = segment.cache.length
                positions = torch.arange(past, past + new, device=self.device).expand(batch, -1)
            x = self.model.embed_tokens(segment.input_ids)
            window = self.config.sliding_window
            mask = segment.cache.mask(segment.attention_mask, positions, new, window)
            rows.append(_Rows(batch, new, self._rope(positions, x.dtype), mask))
            hidden.append(x.reshape(batch * new, -1))
        x = hidden[0] if len(hidden) == 1 else torch.cat(hidden)
        if x.dtype == torch.float16:
            x = x.float()  # the residual stream, as the module's docstring says
        # Each layer's caches, one per segment, in the segments' order.
        layer_caches = zip(*(segment.cache.layers for segment in segments), strict=True)
        delta = None
        for layer, caches in zip(self.model.layers, layer_caches, strict=True):
            x, delta = layer(x, delta, rows, list(caches), self.ops)
        x = x + delta
        start = 0
        for segment, part in zip(segments, rows, strict=True):
            tokens = x[start : start + part.tokens].view(part.batch, part.length, -1)
            keep = segment.logits_to_keep
            kept.append(tokens[:, -keep:] if keep else tokens)
            start += part.tokens
        last = [k.reshape(-1, k.shape[-1]) for k in kept]
        logits = self.lm_head(self.model.norm(last[0] if len(last) == 1 else torch.cat(last)))
        split = logits.split([k.shape[0] * k.shape[1] for k in kept])
        return [part.view(*k.shape[:2], -1) for part, k in zip(split, kept, strict=True)]

    def _rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """Cosines and sines for each row's positions, ``[batch, 1, new, head_dim]``;
        the sines' first half negated, as :func:`_rotate` takes them."""
        freqs = positions[..., None].float() * self.inv_freq
        angles = torch.cat((freqs, freqs), dim=-1)[:, None]
        sin, half = angles.sin().to(dtype), freqs.shape[-1]
        return angles.cos().to(dtype), torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def _attention_mask(mask: torch.Tensor, new: int, window: int | None) -> torch.Tensor:
    """Which keys each new token may attend to, ``[batch, 1, new, length]``:
    earlier real tokens and itself (the latest ``window`` of them). Rows are
    padded on the left only, so a row's real tokens lie in consecutive
    columns and a distance in columns is one in positions.

    A padding token sees only itself, so no row of the attention is empty:
    an empty row gives NaN, which its cached values would then carry into
    every real token's attention (0 weight times NaN is NaN).
    """
    length = mask.shape[1]
    queries = torch.arange(length - new, length, device=mask.device)[:, None]
    keys = torch.arange(length, device=mask.device)[None, :]
    causal = keys <= queries
    if window is not None:
        causal &= keys > queries - window
    allowed = causal[None] & mask[:, None, :].bool()
    return (allowed | (keys == queries)[None])[:, None]
