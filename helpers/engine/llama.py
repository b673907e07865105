"""A Llama-family decoder in plain torch: what replicas run for the popular
small instruct models (the families :mod:`helpers.engine.llama_config` accepts).

Why not transformers' own: importing its modelling code pulls in torch's
compiler and distributed-tensor packages, seconds of every cold start on a
small machine (``bench/RESULTS.md``), for a model whose forward pass is a page
of arithmetic. It accepts the call the continuous batcher makes of a
transformers model (``input_ids``, ``attention_mask``, ``position_ids``,
``cache``, ``logits_to_keep``) and its caches (:mod:`helpers.engine.kv_cache`)
keep the same per-layer ``keys`` and ``values`` tensors, so the batcher drives
either model the same way. The arithmetic follows transformers' step for step
(RMSNorm in fp32, rotate-half RoPE, scaled dot-product attention); model
tests hold every family to transformers' logits on small random checkpoints.

In fp16 the residual stream (the running sum every layer adds to) stays in
fp32: Qwen2 checkpoints are known to grow it past fp16's largest number,
after which every token is NaN; each layer still computes in fp16.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from helpers.engine.decoder import Segment
from helpers.engine.kv_cache import DecodeKernel, KVCache, LayerCache, PagedCache, PagedLayer
from helpers.engine.layer_ops import LayerOps, RMSNorm
from helpers.engine.llama_config import LlamaConfig


@dataclass(frozen=True)
class GenerationDefaults:
    """What the engine reads from ``generation_config.json``: when to stop."""

    eos_token_id: int | list[int] | None


@dataclass
class ModelOutput:
    logits: torch.Tensor


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


@dataclass(frozen=True)
class _SegmentShape:
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
        shapes: list[_SegmentShape],
        caches: list[LayerCache | PagedLayer],
        ops: LayerOps,
    ) -> torch.Tensor:
        """``x`` is every segment's tokens packed, ``[tokens, hidden]``;
        ``shapes`` and ``caches`` are the segments', in the same order."""
        queries, keys, values = self.projections(x)
        norms = (self.q_norm, self.k_norm) if self.qk_norm else None
        outputs, start = [], 0
        for shape, cache in zip(shapes, caches, strict=True):
            end = start + shape.tokens
            by_head = (shape.batch, shape.length, -1, self.head_dim)
            q, k, v = (
                part[start:end].view(by_head).transpose(1, 2) for part in (queries, keys, values)
            )
            q, k = ops.rotate(q, k, *shape.rope, norms)
            out = cache.attend(q, k, v, shape.mask, self.head_dim**-0.5)
            outputs.append(out.transpose(1, 2).reshape(shape.tokens, -1))
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
        shapes: list[_SegmentShape],
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
        delta = self.self_attn(normed, shapes, caches, ops)
        x, normed = ops.add_norm(x, delta, self.post_attention_layernorm)
        return x, self.mlp(normed, ops)


class LlamaModel(nn.Module):
    """The embeddings, the layer stack and the final norm: :class:`Llama`'s
    ``model``, named as in the checkpoints (``model.layers.0.self_attn.q_proj``...),
    so their weights load by name."""

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
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inverse_frequencies(config, "cpu"), persistent=False)
        self.ops = LayerOps()
        """Torch's operations, or a GPU's kernels for them
        (:func:`helpers.engine.kernel_choice.layer_ops`)."""
        self.decode_kernel: DecodeKernel | None = None
        """What a paged cache's decode steps attend with: None for torch's
        attention over gathered pages, or a GPU's kernel
        (:func:`helpers.engine.kernel_choice.paged_decode_kernel`)."""

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def new_cache(self) -> KVCache:
        return KVCache(self.config.num_hidden_layers)

    def new_paged_cache(self, slots: int, pages: int, max_positions: int) -> PagedCache:
        weight = self.model.embed_tokens.weight
        return PagedCache(
            self.config,
            slots,
            pages,
            max_positions,
            weight.dtype,
            weight.device,
            self.decode_kernel,
        )

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
        shapes, hidden, kept = [], [], []
        for segment in segments:
            batch, new = segment.input_ids.shape
            positions = segment.position_ids
            if positions is None:
                past = segment.cache.length
                positions = torch.arange(past, past + new, device=self.device).expand(batch, -1)
            x = self.model.embed_tokens(segment.input_ids)
            window = self.config.sliding_window
            mask = segment.cache.mask(segment.attention_mask, positions, new, window)
            shapes.append(_SegmentShape(batch, new, self._rope(positions, x.dtype), mask))
            hidden.append(x.reshape(batch * new, -1))
        x = hidden[0] if len(hidden) == 1 else torch.cat(hidden)
        if x.dtype == torch.float16:
            x = x.float()  # the residual stream, as the module's docstring says
        # Each layer's caches, one per segment, in the segments' order.
        layer_caches = zip(*(segment.cache.layers for segment in segments), strict=True)
        delta = None
        for layer, caches in zip(self.model.layers, layer_caches, strict=True):
            x, delta = layer(x, delta, shapes, list(caches), self.ops)
        x = x + delta
        start = 0
        for segment, shape in zip(segments, shapes, strict=True):
            tokens = x[start : start + shape.tokens].view(shape.batch, shape.length, -1)
            keep = segment.logits_to_keep
            kept.append(tokens[:, -keep:] if keep else tokens)
            start += shape.tokens
        last = [k.reshape(-1, k.shape[-1]) for k in kept]
        logits = self.lm_head(self.model.norm(last[0] if len(last) == 1 else torch.cat(last)))
        split = logits.split([k.shape[0] * k.shape[1] for k in kept])
        return [part.view(*k.shape[:2], -1) for part, k in zip(split, kept, strict=True)]

    def _rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """Cosines and sines for each row's positions, ``[batch, 1, new, head_dim]``;
        the sines' first half negated, as :func:`helpers.engine.layer_ops._rotate` takes them."""
        freqs = positions[..., None].float() * self.inv_freq
        angles = torch.cat((freqs, freqs), dim=-1)[:, None]
        sin, half = angles.sin().to(dtype), freqs.shape[-1]
        return angles.cos().to(dtype), torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
