"""The 4-bit GGUF blocks and their CPU kernels (helpers/engine/gguf_linear.py)."""

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers.config import EMBEDDED_MODEL_ID, ServeConfig
from helpers.engine import gguf_linear
from helpers.engine.embedded_model import ensure_converted
from helpers.engine.engine import Engine, GenerationRequest, Sampling
from helpers.engine.gguf_linear import GgufLinear
from helpers.engine.llama_config import llama_config
from helpers.engine.llama_loading import load_llama

from .conftest import padded_only

needs_kernels = pytest.mark.skipif(
    not gguf_linear.cpu_can_run(), reason="the kernels need an x86-64 CPU with AVX2, FMA, F16C"
)


@pytest.fixture(scope="module")
def converted() -> Path:
    return ensure_converted(ServeConfig.from_env({}).model_cache_dir)


def random_weight(kind: str, out: int, width: int, seed: int) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    blocks = (out, width // gguf_linear.BLOCK)
    scales = (torch.rand(blocks, generator=generator) * 0.02 - 0.01).half()
    if kind == "Q8_0":
        return torch.randint(-128, 128, (out, width), generator=generator), scales
    offsets = (torch.rand(blocks, generator=generator) * -0.1).half()
    return torch.randint(0, 16, (out, width), generator=generator), scales, offsets


def linear_from(kind: str, parts: tuple[torch.Tensor, ...]) -> GgufLinear:
    out, width = parts[0].shape
    layer = GgufLinear(width, out, kind)
    layer.load_state_dict(gguf_linear.pack(kind, *parts))
    return layer


@pytest.fixture(params=[1, 2], ids=["1 thread", "2 threads"])
def threads(request: pytest.FixtureRequest) -> Iterator[int]:
    """A 1-CPU replica's one thread, and the threads of a bigger one (OpenMP)."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@needs_kernels
@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 8, 11, 64])
def test_the_kernels_give_the_products_of_the_dequantised_weights(
    kind: str, rows: int, threads: int
) -> None:
    # 40 outputs: two pairs of column groups and one group alone; 3 blocks.
    # From 16 rows on, the kernels unpack the quants into a panel first.
    parts = random_weight(kind, 40, 96, seed=rows)
    x = torch.randn(rows, 96, generator=torch.Generator().manual_seed(0))
    expected = x @ gguf_linear.dequantize(kind, *parts).T
    got = linear_from(kind, parts)(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@needs_kernels
def test_a_batch_of_rows_keeps_its_leading_dimensions() -> None:
    parts = random_weight("Q4_1", 16, 64, seed=1)
    x = torch.randn(2, 3, 64)
    got = linear_from("Q4_1", parts)(x)
    assert got.shape == (2, 3, 16)
    torch.testing.assert_close(got[1, 2], linear_from("Q4_1", parts)(x[1, 2:3])[0])


@needs_kernels
def test_rows_the_kernels_cannot_take_are_refused_not_misread() -> None:
    layer = linear_from("Q8_0", random_weight("Q8_0", 8, 32, seed=2))
    for bad in (torch.ones(1, 32, dtype=torch.float16), torch.ones(1, 64)):
        with pytest.raises(ValueError, match="fp32 CPU rows of 32"):
            layer(bad)
    with pytest.raises(ValueError, match="blocks of 32"):
        GgufLinear(48, 8, "Q4_1")


@pytest.fixture
def uncached_builds() -> Iterator[None]:
    """Builds made afresh here, and none of this test's kept for the next."""
    gguf_linear.build.cache_clear()
    yield
    gguf_linear.build.cache_clear()


@needs_kernels
def test_the_kernels_build_into_the_users_cache_and_a_failed_build_means_fp32(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, uncached_builds: None
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert gguf_linear.kernels.__wrapped__() is not None
    assert len(list((tmp_path / "ray-serve-llm" / "kernels").glob("*.so"))) == 1
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("CC", "false")
    gguf_linear.build.cache_clear()
    assert gguf_linear.kernels.__wrapped__() is None
    assert not list(tmp_path.glob("elsewhere/ray-serve-llm/kernels/*"))


@needs_kernels
def test_a_compiler_without_avx512_still_gives_the_avx2_build(
    monkeypatch: pytest.MonkeyPatch, uncached_builds: None
) -> None:
    """On an AVX512 CPU whose compiler refuses the flags, the model keeps its
    4-bit blocks rather than falling back to fp32 weights."""
    compile_for_real = gguf_linear.native_kernels.compiled

    def refusing_avx512(source: Path, flags: tuple[str, ...], cpu_flags: tuple[str, ...]):
        return None if "-mavx512vl" in flags else compile_for_real(source, flags, cpu_flags)

    monkeypatch.setattr(gguf_linear, "cpu_can_run", lambda flags=(): True)
    monkeypatch.setattr(gguf_linear.native_kernels, "compiled", refusing_avx512)
    assert gguf_linear.kernels.__wrapped__() is gguf_linear.build(gguf_linear.AVX2_BUILD)


@needs_kernels
@pytest.mark.skipif(
    not gguf_linear.cpu_can_run(("avx512f", "avx512vl")), reason="this CPU has no AVX512VL"
)
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 16, 40])
def test_the_avx512_build_gives_the_avx2_builds_q4_1_products_to_the_bit(rows: int) -> None:
    """Its quants carry a power of 16 per column, taken out with the scale:
    exact, so the embedded model's text cannot depend on the CPU."""
    layer = linear_from("Q4_1", random_weight("Q4_1", 40, 96, seed=rows))
    x = torch.randn(rows, 96, generator=torch.Generator().manual_seed(rows)) * 4
    products = []
    for flags in (gguf_linear.AVX2_BUILD, gguf_linear.AVX512_BUILD):
        library = gguf_linear.build(flags)
        assert library is not None
        out = torch.empty(rows, 40)
        weights = layer.pointers("blocks", "scales", "offsets")
        assert library.q4_1_matmul(x.data_ptr(), rows, 96, *weights, 40, out.data_ptr(), 1) == 0
        products.append(out)
    assert torch.equal(*products)


@needs_kernels
def test_the_converted_copy_keeps_blocks_that_give_back_its_fp32_weights_exactly(
    converted: Path,
) -> None:
    """A one-hot input reads one column of the weight back out of the kernel,
    with no rounding on the way: d * q (+ m) is what gguf computes too. So
    this checks the conversion's choice of rows, the packing and the kernels
    against the fp32 copy transformers made, to the bit."""
    blocks = load_file(converted / gguf_linear.BLOCKS_FILE)
    fp32 = load_file(converted / "model.safetensors")
    fp32["lm_head.weight"] = fp32.get("lm_head.weight", fp32["model.embed_tokens.weight"])
    layer = "model.layers.{}.{}"
    modules = [layer.format(0, name) for name in gguf_linear.LAYER_MODULES.values()]
    modules += [layer.format(29, "mlp.down_proj"), "lm_head"]
    for module in modules:
        weight = fp32[f"{module}.weight"]
        kind = "Q4_1" if f"{module}.offsets" in blocks else "Q8_0"
        linear = GgufLinear(weight.shape[1], weight.shape[0], kind)
        prefix = module + "."
        linear.load_state_dict(
            {name.removeprefix(prefix): t for name, t in blocks.items() if name.startswith(prefix)}
        )
        columns = torch.randperm(weight.shape[1], generator=torch.Generator().manual_seed(3))[:48]
        read_back = linear(torch.eye(weight.shape[1])[columns]).T
        assert torch.equal(read_back, weight[:, columns]), module
    assert "lm_head.offsets" not in blocks, "the output layer is Q8_0 in the GGUF"


@needs_kernels
def test_the_embedded_model_runs_every_linear_layer_on_blocks(converted: Path) -> None:
    model = load_llama(converted, llama_config(converted), torch.float32, "cpu")
    linears = [m for m in model.modules() if isinstance(m, GgufLinear | torch.nn.Linear)]
    assert len(linears) == 30 * 7 + 1
    assert all(isinstance(m, GgufLinear) for m in linears)


def test_without_the_kernels_the_model_loads_its_fp32_weights(
    converted: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gguf_linear, "kernels", lambda: None)
    model = load_llama(converted, llama_config(converted), torch.float32, "cpu")
    assert not any(isinstance(m, GgufLinear) for m in model.modules())
    assert model.lm_head.weight.dtype == torch.float32


@needs_kernels
@padded_only
def test_blocks_decode_the_text_fp32_weights_do(engine: Engine) -> None:
    """The kernels add in another order than an fp32 matrix product; the
    greedy text must not notice."""
    assert any(isinstance(m, GgufLinear) for m in engine.model.modules())
    fp32 = Engine.load(
        EMBEDDED_MODEL_ID,
        ServeConfig.from_env({}).model_cache_dir,
        cpu_threads=2,
        cpu_weights="float32",
        prepack=False,
    )
    prompts = [
        engine.format_prompt(text, "auto")
        for text in ("Write a haiku about Ray Serve.", "Tell a long story about the number 3.")
    ] + ["The capital of France is", "List three colours:\n1."]
    requests = [GenerationRequest(p, Sampling(32, temperature=0.0, top_p=1.0)) for p in prompts]
    assert [c.text for c in engine.generate(requests)] == [c.text for c in fp32.generate(requests)]
