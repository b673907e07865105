"""From a checkpoint's directory to a :class:`~helpers.engine.llama.Llama` ready to run.

Reading weights is where the device matters: GGUF blocks on a CPU that runs
their kernels, merged projections and Triton kernels on a GPU. Keeping that
here leaves :mod:`helpers.engine.llama` the model's arithmetic alone, the
same on every device.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from helpers.engine import gguf_linear
from helpers.engine.kernel_choice import layer_ops, paged_decode_kernel
from helpers.engine.llama import Llama, rope_inverse_frequencies
from helpers.engine.llama_config import LlamaConfig


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
    become :class:`~helpers.engine.gguf_linear.GgufLinear`. On a GPU its
    Triton kernels are chosen here, where they serve
    (:mod:`helpers.engine.kernel_choice`): the layers' steps and the paged
    cache's decode attention."""
    with torch.device("meta"):
        model = Llama(config, eos_token_id)
        gguf_linear.use_blocks(model, state)
    model.load_state_dict(state, strict=True, assign=True)
    model.inv_freq = rope_inverse_frequencies(config, model.device)
    device, dtype = model.device, model.model.embed_tokens.weight.dtype
    model.ops = layer_ops(config, device, dtype)
    model.decode_kernel = paged_decode_kernel(config, device, dtype)
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
