"""A GGUF file converted by the kit (helpers/engine/gguf_checkpoint.py), checked
against transformers' own reading of the same file, and served as MODEL_ID."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from helpers.config import EMBEDDED_MODEL_ID, ServeConfig
from helpers.engine import gguf_checkpoint
from helpers.engine.embedded_model import ensure_converted, gguf_path
from helpers.engine.engine import Engine, GenerationRequest, Sampling

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def converted() -> Path:
    return ensure_converted(ServeConfig.from_env({}).model_cache_dir)


def test_the_weights_equal_transformers_dequantisation_of_the_file(converted: Path) -> None:
    """transformers reads the GGUF on its own (its loader, de-quantisation and
    row permutation), into a model skeleton made from the converted config."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(converted)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    theirs = load_gguf_checkpoint(str(gguf_path()), return_tensors=True, model_to_load=skeleton)
    ours = load_file(converted / "model.safetensors")
    assert set(ours) == set(theirs["tensors"])
    for name, tensor in ours.items():
        assert torch.equal(tensor, theirs["tensors"][name]), name
    for key, value in theirs["config"].items():
        if key not in ("_model_name_or_path", "rope_theta", "model_type"):
            assert getattr(config, key) == value, key
    assert config.rope_parameters["rope_theta"] == theirs["config"]["rope_theta"]


def test_the_row_order_undoes_llama_cpps_rotary_interleave() -> None:
    heads, head_dim, width = 3, 8, 5
    weight = torch.randn(heads * head_dim, width)
    # llama.cpp's converter: each head's two rotary halves, interleaved row by row.
    stored = (
        weight.reshape(heads, 2, head_dim // 2, width).swapaxes(1, 2).reshape(heads * head_dim, -1)
    )
    assert not torch.equal(stored, weight)
    assert torch.equal(stored[gguf_checkpoint.hf_row_order(heads * head_dim, heads)], weight)


def test_the_blocks_reproduce_the_fp32_weights_row_for_row(converted: Path) -> None:
    from helpers.engine.gguf_linear import dequantize

    weights = load_file(converted / "model.safetensors")
    blocks = load_file(converted / "gguf_blocks" / "blocks.safetensors")
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"]  # tied
    for name in [n.removesuffix(".blocks") for n in blocks if n.endswith(".blocks")]:
        kind = "Q4_1" if f"{name}.offsets" in blocks else "Q8_0"
        quants = _unpacked(kind, blocks[f"{name}.blocks"], weights[f"{name}.weight"].shape)
        scales = _ungrouped(blocks[f"{name}.scales"])
        offsets = _ungrouped(blocks[f"{name}.offsets"]) if kind == "Q4_1" else None
        assert torch.equal(dequantize(kind, quants, scales, offsets), weights[f"{name}.weight"])


def _ungrouped(per_group: torch.Tensor) -> torch.Tensor:
    """``[groups, blocks, 8]`` back to ``[out, blocks]``."""
    return per_group.transpose(1, 2).reshape(-1, per_group.shape[1])


def _unpacked(kind: str, packed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The quants ``[out, in]`` from a GgufLinear's ``blocks`` buffer."""
    out, width = shape
    if kind == "Q8_0":
        return packed.view(out // 8, width, 8).transpose(1, 2).reshape(out, width).long()
    words = torch.from_numpy(packed.numpy().view("<u4").astype(np.int64)).view(out // 8, width)
    nibbles = (words[..., None] >> (4 * torch.arange(8))) & 0xF  # [groups, in, 8]
    return nibbles.transpose(1, 2).reshape(out, width)


def test_a_gguf_model_id_is_converted_once_and_decodes_as_the_embedded_model(
    tmp_path: Path,
) -> None:
    gguf = tmp_path / "models" / "smollm2.gguf"
    gguf.parent.mkdir()
    os.symlink(gguf_path(), gguf)
    cache = tmp_path / "cache"
    request = GenerationRequest(PROMPT, Sampling(8, 0.0, 1.0))
    from_file = Engine.load(str(gguf), cache, cpu_threads=2).generate([request])[0].text
    cache_dir = ServeConfig.from_env({}).model_cache_dir
    embedded = Engine.load(EMBEDDED_MODEL_ID, cache_dir, cpu_threads=2)
    assert from_file == embedded.generate([request])[0].text
    copy = gguf_checkpoint.cached_copy(gguf, cache)
    assert sorted(path.name for path in copy.parent.iterdir()) == [copy.name, f"{copy.name}.lock"]
    assert gguf_checkpoint.is_converted(copy)


def test_an_edited_gguf_file_gets_a_copy_of_its_own(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF")
    before = gguf_checkpoint.cached_copy(path, tmp_path)
    os.utime(path, ns=(1, 1))
    assert gguf_checkpoint.cached_copy(path, tmp_path) != before
    assert before.parent == tmp_path / "gguf"


def test_a_gguf_of_another_architecture_is_refused_by_name(tmp_path: Path) -> None:
    from gguf import GGUFWriter

    path = tmp_path / "tiny-qwen2.gguf"
    writer = GGUFWriter(str(path), "qwen2")
    writer.add_tensor("token_embd.weight", np.zeros((8, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(gguf_checkpoint.UnsupportedGgufError, match="'qwen2'"):
        gguf_checkpoint.ensure_converted(path, tmp_path / "converted")
    assert not (tmp_path / "converted").exists()


def test_setup_prepares_the_model_and_kernels_from_an_empty_home(tmp_path: Path) -> None:
    """What ``make setup`` runs, in a home where nothing was prepared before: a
    step that needs a package the dependency list lacks fails here."""
    home = tmp_path / "home"
    home.mkdir()
    hidden = {"MODEL_CACHE_DIR", "XDG_CACHE_HOME", "HF_HOME", "HF_HUB_CACHE"}
    env = {key: value for key, value in os.environ.items() if key not in hidden}
    result = subprocess.run(
        [sys.executable, "-m", "helpers.engine.embedded_model"],
        env={**env, "HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    converted = Path(result.stdout.strip().splitlines()[-1])
    assert converted.is_relative_to(home / ".cache" / "ray-serve-llm")
    assert gguf_checkpoint.is_converted(converted)
    assert json.loads((converted / "config.json").read_text())["model_type"] == "llama"
    from helpers.engine import gguf_linear

    if gguf_linear.cpu_can_run():
        assert list((home / ".cache" / "ray-serve-llm" / "kernels").glob("*.so"))
