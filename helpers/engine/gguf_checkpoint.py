"""A GGUF file as the checkpoint directory the kit loads, converted once.

Why not transformers' GGUF loader: it de-quantises the whole file on every
load, it needs ``accelerate`` for that, and it re-parses the file's metadata
(tens of thousands of token strings) more than once. Here the ``gguf``
package reads the file once; its de-quantised tensors become an fp32
safetensors checkpoint with a ``config.json`` the kit's Llama reads, and the
4-bit blocks of the linear layers are kept beside it for the CPU kernels
(:mod:`helpers.engine.gguf_linear`). The tokenizer still comes from transformers'
GGUF tokenizer conversion, which is fast and knows the vocabulary formats.

Only the ``llama`` architecture is converted, the one the kit's decoder runs
(SmolLM2, TinyLlama, Llama 2 and Mistral files as llama.cpp writes them).
"""

from __future__ import annotations

import fcntl
import hashlib
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm import tqdm

from helpers.engine import gguf_linear

_COMPLETE_MARKER = ".complete"
# Written into the marker; a copy made by an older layout is converted again.
# 2: the GGUF blocks for the CPU kernels came in. 3: converted with ``gguf``.
LAYOUT = "3"
CACHED_GGUF_DIR = "gguf"  # in the model cache: the copies of GGUF files named by MODEL_ID

# GGUF's per-layer tensor names and where each goes in a Llama layer.
LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    **gguf_linear.LAYER_MODULES,
}
TOP_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}


VOCABULARY_FIELDS = frozenset(
    f"tokenizer.ggml.{name}" for name in ("tokens", "token_type", "scores", "merges")
)


# Special tokens as transformers' config names them, and as GGUF does.
SPECIAL_TOKENS = {"bos": "bos", "eos": "eos", "pad": "padding", "unk": "unknown"}


class UnsupportedGgufError(ValueError):
    """The GGUF file holds a model the kit's conversion does not know."""


def is_converted(target: Path) -> bool:
    marker = target / _COMPLETE_MARKER
    return marker.is_file() and marker.read_text().strip() == LAYOUT


def cached_copy(source: Path, cache_dir: Path) -> Path:
    """Where a ``MODEL_ID`` naming a GGUF file is converted to: one copy per
    file, path, size and modification time, so an edited file converts again."""
    stat = source.stat()
    identity = f"{source.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    digest = hashlib.sha256(identity.encode()).hexdigest()[:16]
    return cache_dir / CACHED_GGUF_DIR / f"{source.stem}-{digest}"


def ensure_converted(source: Path, target: Path) -> Path:
    """Return ``target``, converting ``source`` into it first if need be.

    The copy is written into a temporary directory and renamed into place, so
    a conversion killed half-way never leaves a directory that looks usable;
    a lock makes replicas that start together convert once.
    """
    if is_converted(target):
        return target
    with _exclusive(target.with_name(f"{target.name}.lock")):
        if is_converted(target):
            return target
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".converting-") as tmp:
            convert(source, Path(tmp) / "model")
            shutil.rmtree(target, ignore_errors=True)
            Path(tmp, "model").rename(target)
    return target


@contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def convert(source: Path, out_dir: Path) -> None:
    """Write ``source``'s config, tokenizer, fp32 weights and GGUF blocks into
    ``out_dir``, which must not exist yet."""
    from gguf import GGUFReader
    from transformers import GenerationConfig

    steps = tqdm(total=4, desc=f"Converting {source.name}", unit="step")
    steps.set_postfix_str("reading GGUF")
    reader = GGUFReader(str(source))
    metadata = {
        name: field.contents()
        for name, field in reader.fields.items()
        if name not in VOCABULARY_FIELDS  # the tokenizer's to read, and slow to turn into lists
    }
    architecture = metadata.get("general.architecture")
    if architecture != "llama":
        raise UnsupportedGgufError(
            f"{source}: GGUF architecture {architecture!r} cannot be converted here; the kit "
            "converts 'llama' files. Serve the model's directory or hub id instead."
        )
    steps.update()
    steps.set_postfix_str("de-quantising weights")
    shapes = {tensor.name: tensor.data.shape for tensor in reader.tensors}
    config = llama_config(
        metadata, vocab_rows=shapes["token_embd.weight"][0], tied="output.weight" not in shapes
    )
    weights, blocks = read_tensors(reader.tensors, config)
    steps.update()
    steps.set_postfix_str("writing safetensors")
    out_dir.mkdir(parents=True)
    config.save_pretrained(out_dir)
    GenerationConfig.from_model_config(config).save_pretrained(out_dir)
    save_file(weights, out_dir / "model.safetensors", metadata={"format": "pt"})
    (out_dir / gguf_linear.BLOCKS_FILE).parent.mkdir()
    save_file(blocks, out_dir / gguf_linear.BLOCKS_FILE)
    steps.update()
    steps.set_postfix_str("converting the tokenizer")
    _tokenizer(source).save_pretrained(out_dir)
    (out_dir / _COMPLETE_MARKER).write_text(LAYOUT)
    steps.update()
    steps.close()


def llama_config(metadata: dict[str, Any], vocab_rows: int, tied: bool) -> Any:
    """transformers' ``LlamaConfig`` from the file's ``llama.*`` keys and the
    embedding's rows (older files have no ``llama.vocab_size``)."""
    from transformers import LlamaConfig

    def key(name: str, default: Any = None) -> Any:
        value = metadata.get(f"llama.{name}", default)
        if value is None:
            raise UnsupportedGgufError(f"the GGUF file has no 'llama.{name}'")
        return value

    heads = key("attention.head_count")
    hidden = key("embedding_length")
    special = {
        f"{name}_token_id": metadata.get(f"tokenizer.ggml.{gguf_name}_token_id")
        for name, gguf_name in SPECIAL_TOKENS.items()
    }
    return LlamaConfig(
        vocab_size=key("vocab_size", vocab_rows),
        hidden_size=hidden,
        intermediate_size=key("feed_forward_length"),
        num_hidden_layers=key("block_count"),
        num_attention_heads=heads,
        num_key_value_heads=key("attention.head_count_kv", heads),
        head_dim=key("rope.dimension_count", hidden // heads),
        max_position_embeddings=key("context_length"),
        rms_norm_eps=key("attention.layer_norm_rms_epsilon"),
        rope_parameters={"rope_type": "default", "rope_theta": key("rope.freq_base", 10000.0)},
        tie_word_embeddings=tied,
        architectures=["LlamaForCausalLM"],
        dtype="float32",
        **special,
    )


def read_tensors(
    tensors: list[Any], config: Any
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The fp32 checkpoint (transformers' names and row order) and, for each
    linear layer stored as Q4_1 or Q8_0, its blocks packed for the kernels.

    llama.cpp stores the queries' and keys' rows interleaved for its RoPE;
    :func:`hf_row_order` undoes that for the fp32 weight and its blocks alike.
    """
    from gguf import dequantize

    weights: dict[str, torch.Tensor] = {}
    blocks: dict[str, torch.Tensor] = {}
    for tensor in tensors:
        module = module_name(tensor.name)
        values = torch.from_numpy(dequantize(tensor.data, tensor.tensor_type).astype(np.float32))
        order = _row_order(tensor.name, values.shape[0], config)
        weights[f"{module}.weight"] = values[order].contiguous()
        kind = tensor.tensor_type.name
        if module == "model.embed_tokens" and config.tie_word_embeddings:
            module = "lm_head"  # tied: the embedding table is also the output layer
        if module == "lm_head" or module.endswith("_proj"):  # the linear layers
            blocks |= _packed(module, kind, tensor.data, values.shape, order)
    return weights, blocks


def module_name(gguf_name: str) -> str:
    """Where a GGUF tensor goes in transformers' Llama, or a clear error."""
    base, _, suffix = gguf_name.rpartition(".")
    pieces = base.split(".")
    if suffix == "weight" and base in TOP_TENSORS:
        return TOP_TENSORS[base]
    in_a_layer = len(pieces) == 3 and pieces[0] == "blk" and pieces[2] in LAYER_TENSORS
    if suffix == "weight" and in_a_layer:
        return f"model.layers.{pieces[1]}.{LAYER_TENSORS[pieces[2]]}"
    raise UnsupportedGgufError(
        f"GGUF tensor {gguf_name!r} has no place in the kit's Llama (llama.cpp files with "
        "RoPE scaling factors, biases or experts are not converted here)"
    )


def _row_order(gguf_name: str, rows: int, config: Any) -> torch.Tensor | slice:
    if gguf_name.endswith(".attn_q.weight"):
        return hf_row_order(rows, config.num_attention_heads)
    if gguf_name.endswith(".attn_k.weight"):
        return hf_row_order(rows, config.num_key_value_heads)
    return slice(None)


def hf_row_order(rows: int, heads: int) -> torch.Tensor:
    """For each row of transformers' query or key weight, its row in the GGUF.

    transformers keeps each head's rotary pairs half a head apart (rows ``j``
    and ``j + d/2``); llama.cpp's converter puts them side by side (rows
    ``2j`` and ``2j + 1``)."""
    per_head = rows // heads
    return torch.arange(rows).view(heads, per_head // 2, 2).transpose(1, 2).reshape(-1)


def _packed(
    module: str, kind: str, raw: np.ndarray, shape: torch.Size, order: torch.Tensor | slice
) -> dict[str, torch.Tensor]:
    """The layer's blocks for :class:`~helpers.engine.gguf_linear.GgufLinear`, or
    nothing where the kernels cannot take them (another type, another shape)."""
    out, width = shape
    if kind not in ("Q4_1", "Q8_0") or width % gguf_linear.BLOCK or out % gguf_linear.GROUP:
        return {}
    parts = gguf_linear.split_blocks(kind, raw, shape)
    ordered = [None if part is None else part[order] for part in parts]
    return {f"{module}.{name}": value for name, value in gguf_linear.pack(kind, *ordered).items()}


def _tokenizer(source: Path) -> Any:
    """transformers' tokenizer for the file: its GGUF vocabulary conversion
    with the file's special tokens and chat template."""
    from transformers import TokenizersBackend

    return TokenizersBackend.from_pretrained(source.parent, gguf_file=source.name)
