"""Q8_0 weights made at load for any checkpoint (helpers/engine/cpu_weights.py)."""

import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import quantize as gguf_quantize
from torch import nn

from bench.cpu_weights_quality import PROMPTS, TEXT, agreement, greedy_ids, perplexity
from bench.versus_transformers import QWEN2_5_0_5B, random_qwen2
from helpers.config import EMBEDDED_MODEL_ID, ServeConfig
from helpers.engine import cpu_weights, gguf_linear, int8_linear
from helpers.engine.cpu_weights import q8_0_linear, quantize_linear_layers, quantize_q8_0
from helpers.engine.engine import Engine, GenerationRequest, Sampling
from helpers.engine.gguf_linear import GgufLinear
from helpers.engine.int8_linear import Int8Linear

needs_kernels = pytest.mark.skipif(
    gguf_linear.kernels() is None,
    reason="the kernels need an x86-64 CPU with AVX2, FMA, F16C and a C compiler",
)
Q8_0_LAYER = Int8Linear if int8_linear.kernels() is not None else GgufLinear
"""What this machine quantizes a layer of 16 outputs or more to."""


@pytest.fixture(
    params=[
        pytest.param(
            Int8Linear,
            id="int8 kernel",
            marks=pytest.mark.skipif(
                int8_linear.kernels() is None, reason="the int8 kernel needs AVX512-VNNI"
            ),
        ),
        pytest.param(GgufLinear, id="fp32 kernel"),
    ]
)
def kernel(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> type:
    """Each Q8_0 kernel this machine has; the fp32 one is what runs where the
    int8 one cannot."""
    if request.param is GgufLinear:
        monkeypatch.setattr(int8_linear, "kernels", lambda: None)
    return request.param


def awkward_weight(out: int, width: int, seed: int) -> torch.Tensor:
    """Random weights of several magnitudes, with the blocks that catch a
    careless quantizer: all zeros, exact halves to round, one huge weight."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out, width, generator=generator) * 0.05
    weight[1] *= 40
    weight[2, :32] = 0
    weight[3, :32] = (torch.arange(32) - 15.5) / 127  # x / d lands on .5 in places
    weight[3, 0] = 127 / 127
    weight[4, 32:64] = 1e-7  # a scale below fp16's normal range
    weight[5, 5] = 300.0
    return weight


def test_the_blocks_are_gguf_q8_0_byte_for_byte() -> None:
    """The quants and scales are what gguf's reference quantizer writes (it
    is itself bit-exact with llama.cpp's quantize_row_q8_0_ref), read back
    with the same split_blocks the GGUF conversion uses."""
    weight = awkward_weight(24, 128, seed=0)
    quants, scales = quantize_q8_0(weight)
    raw = gguf_quantize(weight.numpy(), GGMLQuantizationType.Q8_0)
    gguf_quants, gguf_scales, _ = gguf_linear.split_blocks("Q8_0", raw, weight.shape)
    assert quants.dtype == torch.int8 and scales.dtype == torch.float16
    assert torch.equal(quants.to(torch.int16), gguf_quants)
    assert np.array_equal(scales.numpy().view(np.uint16), gguf_scales.numpy().view(np.uint16))


def test_halves_round_away_from_zero_as_c_roundf_does() -> None:
    # A block whose largest weight is 127 has d = 1 exactly, so these weights
    # are their own x / d: torch.round would give 2, -4, 0, 2, 0 (half to even).
    block = torch.zeros(1, 32)
    block[0, :6] = torch.tensor([127.0, 2.5, -3.5, 0.5, 1.5, -0.5])
    quants, scales = quantize_q8_0(block)
    assert quants[0, :6].tolist() == [127, 3, -4, 1, 2, -1]
    assert scales.tolist() == [[1.0]]


def test_values_a_few_ulps_around_every_half_round_as_gguf_rounds_them() -> None:
    """n + 0.5 and its neighbours 1 to 3 floats away, for every n the quants
    reach, both signs: where a shortcut for roundf would go wrong."""
    halves = torch.arange(128.0) + 0.5
    below = above = halves
    around = [halves]
    for _ in range(3):
        below = below.nextafter(torch.tensor(0.0))
        above = above.nextafter(torch.tensor(1000.0))
        around += [below, above]
    values = torch.cat(around).clamp(max=127.0)
    values = torch.cat([values, -values])
    # Blocks of 31 such values each behind a 127: d = 1, so x / d = x.
    blocks = values[: values.numel() // 31 * 31].view(-1, 31)
    weight = torch.cat([torch.full((blocks.shape[0], 1), 127.0), blocks], dim=1)
    quants, _ = quantize_q8_0(weight)
    raw = gguf_quantize(weight.numpy(), GGMLQuantizationType.Q8_0)
    expected = gguf_linear.split_blocks("Q8_0", raw, weight.shape)[0]
    assert torch.equal(quants.to(torch.int16), expected)


@needs_kernels
@needs_kernels
def test_the_blocks_give_back_the_weights_within_q8_0s_rounding(kernel: type) -> None:
    """A one-hot row reads one column of the weight back out of the kernel
    (d16 * q, up to a few ulps where the row's own scale 1/127 comes in), so
    this checks the packing too. Per block the error is at most half a step
    of the fp32 scale the quants were rounded with, plus the quants times
    that scale's fp16 rounding: d/2 + 127 |d - d16|."""
    weight = awkward_weight(48, 96, seed=1)
    linear = nn.Linear(96, 48, bias=False)
    linear.weight.data = weight
    layer = q8_0_linear(linear)
    assert type(layer) is kernel
    read_back = layer(torch.eye(96)).T
    blocks = weight.view(48, 3, 32)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    bound = d / 2 + 127 * (d - d.half().float()).abs()
    error = (read_back.view(48, 3, 32) - blocks).abs()
    assert (error <= bound * (1 + 1e-6) + 1e-6 * blocks.abs()).all()
    assert (error > 0.45 * d).any(), "the bound is not loose: some weights sit near half a step"


@needs_kernels
@pytest.mark.parametrize("bias", [False, True], ids=["no bias", "bias"])
def test_a_quantized_layer_gives_nn_linears_product(bias: bool, kernel: type) -> None:
    """Both kernels: the int8 one also rounds each row to 8 bits per block."""
    torch.manual_seed(2)
    linear = nn.Linear(256, 48, bias=bias)
    x = torch.randn(5, 3, 256)
    layer = q8_0_linear(linear)
    assert type(layer) is kernel and layer.kind == "Q8_0"
    with torch.no_grad():
        expected = linear(x)
        got = layer(x)
    assert got.shape == expected.shape
    # Each weight is off by at most half a step, 1/254 of its block's largest.
    torch.testing.assert_close(got, expected, rtol=0, atol=0.02)
    scale = expected.abs().mean()
    assert (got - expected).abs().mean() < scale / 100


@needs_kernels
def test_the_bias_is_added_in_fp32_after_the_product(kernel: type) -> None:
    linear = nn.Linear(64, 16)
    with torch.no_grad():
        linear.weight.zero_()
        linear.bias.copy_(torch.arange(16.0) - 8)
    layer = q8_0_linear(linear)
    assert type(layer) is kernel
    assert layer.bias.dtype == torch.float32 and "bias" in layer.state_dict()
    assert torch.equal(layer(torch.randn(3, 64)), linear.bias.detach().expand(3, 16))
    assert q8_0_linear(nn.Linear(64, 16, bias=False)).bias is None


class Owner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fits = nn.Linear(64, 16, bias=True)
        self.odd_inputs = nn.Linear(48, 16)
        self.odd_outputs = nn.Linear(64, 12)
        self.half = nn.Linear(64, 16).to(torch.bfloat16)
        self.inner = nn.Sequential(nn.Linear(32, 8), nn.ReLU())


@needs_kernels
def test_only_fp32_layers_of_shapes_the_kernels_take_are_replaced(kernel: type) -> None:
    """16 outputs take either kernel; 8 outputs only the fp32 one."""
    model = Owner()
    left_alone = [model.odd_inputs, model.odd_outputs, model.half]
    assert quantize_linear_layers(model) == 2
    assert type(model.fits) is kernel and model.fits.bias is not None
    assert type(model.inner[0]) is GgufLinear
    assert [model.odd_inputs, model.odd_outputs, model.half] == left_alone


def test_without_the_kernels_nothing_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gguf_linear, "kernels", lambda: None)
    model = Owner()
    assert quantize_linear_layers(model) == 0
    assert type(model.fits) is nn.Linear


@needs_kernels
def test_each_fp32_weight_is_let_go_before_the_next_layer_is_quantized(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Layer by layer: the peak is the fp32 model plus one layer's blocks,
    not the fp32 model twice."""
    model = nn.Sequential(*(nn.Linear(64, 64) for _ in range(4)))
    weights = [weakref.ref(layer.weight) for layer in model]
    alive_when_quantizing: list[int] = []
    original = cpu_weights.q8_0_linear

    def watching(linear: nn.Linear) -> Int8Linear | GgufLinear:
        alive_when_quantizing.append(sum(w() is not None for w in weights))
        return original(linear)

    monkeypatch.setattr(cpu_weights, "q8_0_linear", watching)
    assert quantize_linear_layers(model) == 4
    assert alive_when_quantizing == [4, 3, 2, 1]


def embedded_fp32() -> Engine:
    return Engine.load(
        EMBEDDED_MODEL_ID,
        ServeConfig.from_env({}).model_cache_dir,
        cpu_threads=2,
        prepack=False,
        cpu_weights="float32",
    )


@pytest.fixture(scope="module")
def fp32_and_q8_0() -> tuple[Engine, Engine]:
    """The embedded model in fp32, and quantized as this machine quantizes it."""
    fp32, quantized = embedded_fp32(), embedded_fp32()
    quantize_linear_layers(quantized.model)
    return fp32, quantized


@needs_kernels
def test_a_tied_output_layer_is_quantized_while_the_embedding_stays_fp32(
    fp32_and_q8_0: tuple[Engine, Engine],
) -> None:
    fp32, quantized = fp32_and_q8_0
    model = quantized.model
    assert model.config.tie_word_embeddings
    linears = [m for m in model.modules() if isinstance(m, Int8Linear | GgufLinear | nn.Linear)]
    assert len(linears) == 30 * 7 + 1
    assert all(type(m) is Q8_0_LAYER and m.kind == "Q8_0" for m in linears)
    embedding = model.model.embed_tokens.weight
    assert embedding.dtype == torch.float32
    assert torch.equal(embedding, fp32.model.model.embed_tokens.weight)


@needs_kernels
def test_the_embedded_models_perplexity_stays_within_one_percent_of_fp32(
    fp32_and_q8_0: tuple[Engine, Engine],
) -> None:
    """The issue's bar, on the benchmark's text (575 tokens). Measured here
    with int8 rows: +0.24%; with fp32 rows: -0.10%. A block packed or scaled
    wrongly moves it by far more."""
    fp32, quantized = fp32_and_q8_0
    ids = fp32.tokenizer(TEXT)["input_ids"]
    change = perplexity(quantized.model, ids) / perplexity(fp32.model, ids) - 1
    assert abs(change) <= 0.01, change


@needs_kernels
def test_on_the_fp32_kernel_the_greedy_text_stays_nearly_fp32s(
    fp32_and_q8_0: tuple[Engine, Engine], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With fp32 rows only the weights are rounded, so greedy text stays
    close: on these 8 chat prompts x 32 tokens, 6 of 8 identical, the other
    two parting at tokens 8 and 12, 83% of the tokens before the first
    divergence. The bounds leave a prompt's worth of room and no more:
    weights off by a step part the texts in their first tokens. (Int8 rows
    add their own rounding and near ties go the other way from the first
    token on, so there perplexity is the measure:
    ``python -m bench.cpu_weights_quality`` reports both.)"""
    monkeypatch.setattr(int8_linear, "kernels", lambda: None)
    fp32 = fp32_and_q8_0[0]
    quantized = embedded_fp32()
    quantize_linear_layers(quantized.model)
    prompts = [
        fp32.tokenizer(fp32.format_prompt(text, "auto"))["input_ids"] for text in PROMPTS[:8]
    ]
    reference = greedy_ids(fp32.model, prompts, 32)
    exact, share = agreement(greedy_ids(quantized.model, prompts, 32), reference)
    assert exact >= 5, (exact, share)
    assert share >= 0.75, (exact, share)


TINY_QWEN2 = QWEN2_5_0_5B | {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "vocab_size": 1024,
}


@needs_kernels
def test_a_qwen2_checkpoint_runs_on_q8_0_blocks_with_its_biases(tmp_path: Path) -> None:
    """The speed benchmark's Qwen2 checkpoint, tiny: q/k/v keep their fp32
    biases on Q8_0 blocks, the logits stay fp32's up to Q8_0's rounding, and
    its zeroed special tokens never win, so greedy requests run their full
    length (what ``bench.versus_transformers --random-qwen2-0.5b`` relies on)."""
    directory = random_qwen2(tmp_path / "qwen2", TINY_QWEN2)

    def load(weights: str) -> Engine:
        return Engine.load(
            str(directory), tmp_path / "cache", cpu_threads=2, prepack=False, cpu_weights=weights
        )

    fp32, quantized = load("float32"), load("q8_0")
    int8 = Q8_0_LAYER is Int8Linear
    assert quantized.info.weights == "Q8_0 blocks" + (", int8 activations" if int8 else "")
    ours, theirs = quantized.model.model.layers[1].self_attn, fp32.model.model.layers[1].self_attn
    for name in ("q_proj", "k_proj", "v_proj"):
        layer = getattr(ours, name)
        assert type(layer) is Q8_0_LAYER and layer.kind == "Q8_0", name
        assert torch.equal(layer.bias, getattr(theirs, name).bias.detach()), name
    assert type(ours.o_proj) is Q8_0_LAYER and ours.o_proj.bias is None
    ids = torch.tensor(
        [fp32.tokenizer("The quick brown fox jumps over the lazy dog.")["input_ids"]]
    )
    with torch.inference_mode():
        expected, got = fp32.model(ids).logits, quantized.model(ids).logits
    error, scale = (got - expected).abs(), expected.std()
    # Measured: at most 0.032 and 0.006 of the scale with fp32 rows, 0.053
    # and 0.008 with int8 rows.
    assert error.max() < 0.08 * scale and error.mean() < 0.015 * scale, (error.max(), scale)
    requests = [
        GenerationRequest(prompt, Sampling(48, temperature=0.0, top_p=1.0))
        for prompt in ("Hello there", "Ray Serve runs the application", "1234")
    ]
    for engine in (fp32, quantized):
        completions = engine.generate(requests)
        assert [(c.completion_tokens, c.finish_reason) for c in completions] == [(48, "length")] * 3
