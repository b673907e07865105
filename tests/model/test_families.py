"""Every family the kit's decoder runs, held to transformers' own model.

Each checkpoint is built here at random (``tests/family_checkpoints.py``),
the tensors transformers initialises to constants (biases at zero, norm
weights at one) included, so a decoder that skipped a bias or a norm could
not give the same logits and pass unnoticed.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from jinja2 import Template, UndefinedError
from safetensors.torch import load_file, save_file

from helpers.config import ServeConfig
from helpers.engine import paged_rows
from helpers.engine.engine import SCORING_CHUNK, Engine, GenerationRequest, Sampling
from helpers.engine.llama_config import llama_config
from helpers.engine.llama_loading import load_llama, merge_projections
from helpers.engine.paged_rows import FIRST_PAGES
from helpers.protocol import FieldError, Message
from tests.family_checkpoints import FAMILIES, build_checkpoint
from tests.triton_interpreter import STEPS as FUSED_STEPS
from tests.triton_interpreter import counted, fused_layer_ops

PROMPTS = [
    "The quick brown fox",
    "Ray Serve runs the application on a cluster, and the replicas scaled to zero at 08:30.",
    "Hello",
]
"""Of different lengths, so a batch pads them; the second is longer than the
sliding window of ``mistral-window``."""
STEPS = 12


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    built = {}
    for index, family in enumerate(FAMILIES):
        built[family] = build_checkpoint(family, root / family, seed=index)
    return built


def transformers_model(directory: Path, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_the_kit_decoder_gives_transformers_logits(
    family: str, checkpoints: dict[str, Path]
) -> None:
    directory = checkpoints[family]
    theirs = transformers_model(directory)
    ours = load_llama(directory, llama_config(directory), torch.float32, "cpu")
    assert ours.config.family == FAMILIES[family].model_type
    vocab = ours.config.vocab_size
    ids = torch.randint(0, vocab, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected, got = theirs(input_ids=ids).logits, ours(input_ids=ids).logits
        assert torch.allclose(expected, got, atol=1e-4), (expected - got).abs().max()
        assert torch.equal(expected.argmax(-1), got.argmax(-1))
        # Several greedy steps through the kit's cache, against transformers
        # reading the whole sequence again each step.
        cache, step = ours.new_cache(), ids
        for _ in range(STEPS):
            token = ours(input_ids=step, cache=cache).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, token], dim=1)
            assert torch.equal(token[:, 0], theirs(input_ids=ids[:, :-1]).logits[:, -1].argmax(-1))
            step = token


@pytest.mark.parametrize("slots", [False, True], ids=["padded", "slots"])
@pytest.mark.parametrize("family", FAMILIES)
def test_the_engine_decodes_transformers_greedy_text(
    family: str, slots: bool, checkpoints: dict[str, Path]
) -> None:
    """Through the engine (tokenizer, batcher, either cache layout) the
    prompts, decoded together, give what ``generate`` gives each alone."""
    from transformers import AutoTokenizer

    directory = checkpoints[family]
    engine = Engine.load(
        str(directory),
        ServeConfig.from_env({}).model_cache_dir,
        cpu_threads=2,
        prepack=False,
        slots=slots,
    )
    assert engine.info.implementation == "kit-decoder"
    assert engine.info.architecture == FAMILIES[family].model_type
    assert (engine.info.dtype, engine.info.device) == ("float32", "cpu")
    requests = [GenerationRequest(p, Sampling(STEPS, 0.0, 1.0)) for p in PROMPTS]
    got = [completion.text for completion in engine.generate(requests)]

    tokenizer, model = AutoTokenizer.from_pretrained(directory), transformers_model(directory)
    expected = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt")
        new = model.generate(**ids, max_new_tokens=STEPS, do_sample=False)[
            0, ids.input_ids.shape[1] :
        ]
        expected.append(tokenizer.decode(new, skip_special_tokens=True))
    assert got == expected


def test_a_conversation_the_chat_template_refuses_is_refused_by_its_field(
    checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mistral's template raises on two user turns in a row: the client's
    error to fix, named, rather than the server's."""
    engine = Engine.load(
        str(checkpoints["mistral"]), ServeConfig.from_env({}).model_cache_dir, cpu_threads=2
    )
    assert engine.render_conversation((Message("user", "Hi"), Message("assistant", "Hello")))
    with pytest.raises(FieldError, match="roles must alternate") as refused:
        engine.render_conversation((Message("user", "Hi"), Message("user", "Hello?")))
    assert refused.value.field == "messages"

    # A template that fails on its own (a name it never defined) is the server's fault.
    monkeypatch.setattr(engine.tokenizer, "_template", Template("{{ never_defined.here }}"))
    with pytest.raises(UndefinedError):
        engine.render_conversation((Message("user", "Hi"),))


@pytest.mark.parametrize("family", FAMILIES)
def test_slots_decode_the_padded_text_at_256_sequences(
    family: str, checkpoints: dict[str, Path]
) -> None:
    """256 sequences at once, of many lengths, in slots of a paged cache that
    grows past its first pages for them: the padded layout's greedy text."""
    directory, cache = str(checkpoints[family]), ServeConfig.from_env({}).model_cache_dir
    padded, paged = (
        Engine.load(directory, cache, cpu_threads=2, prepack=False, slots=s, max_batch_size=256)
        for s in (False, True)
    )
    requests = [
        GenerationRequest(f"{PROMPTS[i % 3]} {i}" * (1 + i % 4), Sampling(8, 0.0, 1.0))
        for i in range(256)
    ]
    longest = max(len(request.token_ids(paged.tokenizer)) for request in requests)
    assert longest + 8 <= paged.context_length, "every sequence fits the model's context"
    expected = [completion.text for completion in padded.generate(requests)]
    assert [completion.text for completion in paged.generate(requests)] == expected
    # The padded layout, the reference, takes them in groups of about one
    # length (decision 0038), so its shortest may end before its longest join.
    assert paged.stats.largest_batch == 256
    assert paged._batcher._rows.cache.pages > FIRST_PAGES


@pytest.mark.parametrize("family", FAMILIES)
def test_a_prompt_past_the_prefill_budget_decodes_the_padded_text_from_pieces(
    family: str, checkpoints: dict[str, Path]
) -> None:
    """A prompt too long for one pass is prefilled a piece a pass, the pieces
    shrinking as their columns grow (as on a GPU with little room for a
    pass's attention, ``prefill_area``), each attending through the pages to
    those before it (and, in ``mistral-window``, across its window's edge):
    the padded layout's greedy text, admitted beside a short prompt."""
    directory, cache = str(checkpoints[family]), ServeConfig.from_env({}).model_cache_dir
    padded, paged = (
        Engine.load(directory, cache, cpu_threads=2, prepack=False, slots=s, max_batch_size=4)
        for s in (False, True)
    )
    requests = [GenerationRequest(p, Sampling(8, 0.0, 1.0)) for p in (PROMPTS[1] * 3, PROMPTS[0])]
    length = len(requests[0].token_ids(paged.tokenizer))
    assert length + 8 <= paged.context_length, "the sequence fits the model's context"
    area = 48 * 48
    paged._batcher._rows.prefill_area = area
    pieces = paged_rows.prefill_pieces(length, area)
    assert len(pieces) > 3 and pieces[0][1] > pieces[-2][1] - pieces[-2][0], "they shrink"
    expected = [completion.text for completion in padded.generate(requests)]
    assert [completion.text for completion in paged.generate(requests)] == expected
    assert paged._batcher._rows.prefill_passes == len(pieces) + 1, "a pass per piece, one more"


@pytest.mark.parametrize("family", FAMILIES)
def test_a_gpus_kernels_give_the_padded_text(family: str, checkpoints: dict[str, Path]) -> None:
    """A GPU's path, in Triton's interpreter here: the projections merged,
    decode steps that read each row's pages in place, and every layer's
    steps between its matrix products in torch's operations (where a GPU's
    kernels fail their check), then fused; across ``mistral-window``'s
    window too."""
    directory, cache = str(checkpoints[family]), ServeConfig.from_env({}).model_cache_dir
    padded, paged = (
        Engine.load(directory, cache, cpu_threads=2, prepack=False, slots=s, max_batch_size=4)
        for s in (False, True)
    )
    merge_projections(paged.model)
    calls: list[int] = []
    paged._batcher._rows.cache.decode_kernel = counted(calls)
    requests = [GenerationRequest(p, Sampling(STEPS, 0.0, 1.0)) for p in PROMPTS]
    expected = [completion.text for completion in padded.generate(requests)]
    assert [completion.text for completion in paged.generate(requests)] == expected
    steps: list[str] = []
    paged.model.ops = fused_layer_ops(steps)
    assert [completion.text for completion in paged.generate(requests)] == expected
    assert calls, "decode steps ran the kernel"
    assert set(steps) == set(FUSED_STEPS), "every fused step ran"
    assert not hasattr(paged.model.model.layers[0].mlp, "up_proj"), "one matrix for two"


def transformers_path(checkpoints: dict[str, Path], tmp_path: Path) -> Path:
    """The Qwen2 checkpoint with per-layer sliding windows, which the kit's
    decoder leaves to transformers."""
    directory = tmp_path / "qwen2-sliding"
    directory.mkdir()
    for file in checkpoints["qwen2"].iterdir():
        (directory / file.name).write_bytes(file.read_bytes())
    config = json.loads((directory / "config.json").read_text())
    config |= {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}
    config.pop("layer_types", None)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def test_a_checkpoint_the_decoder_does_not_run_names_transformers_and_why(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    """Qwen2's per-layer sliding windows are left to transformers, and the
    engine says so, with the reason."""
    directory = transformers_path(checkpoints, tmp_path)
    engine = Engine.load(str(directory), tmp_path / "cache", cpu_threads=2)
    assert engine.info.implementation == "transformers"
    assert engine.info.architecture == "qwen2"
    assert "sliding window" in (engine.info.fallback_reason or "")
    [completion] = engine.generate([GenerationRequest(PROMPTS[1], Sampling(4, 0.0, 1.0))])
    assert completion.completion_tokens == 4 or completion.finish_reason == "stop"


def test_request_controls_and_logprobs_hold_on_the_transformers_path(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    """The same sampler, scoring and shared prefills serve transformers'
    models: held to transformers' own forward pass, without the engine."""
    directory = transformers_path(checkpoints, tmp_path)
    engine = Engine.load(str(directory), tmp_path / "cache", cpu_threads=2)
    assert engine.info.implementation == "transformers"
    greedy = Sampling(6, 0.0, 1.0, logprobs=2, ignore_eos=True)
    top_one = replace(greedy, temperature=1.5, seed=3, top_k=1)
    prompt = PROMPTS[0]
    plain, repeated, sampled = engine.generate(
        [
            GenerationRequest(prompt, greedy),
            GenerationRequest(prompt, greedy),
            GenerationRequest(prompt, top_one),
        ]
    )
    assert plain.text == repeated.text == sampled.text and plain.logprobs
    for field in ("prompt_tokens", "completion_tokens", "finish_reason"):
        assert getattr(plain, field) == getattr(repeated, field)
    # Two equal rows of one batch need not round alike in attention's CPU
    # kernel (seen on an AMD EPYC host), so their log probabilities agree
    # to rounding, their tokens exactly.
    for mine, theirs in zip(plain.logprobs or (), repeated.logprobs or (), strict=True):
        assert mine.token == theirs.token
        assert [t for t, _ in mine.top] == [t for t, _ in theirs.top]
        assert mine.logprob == pytest.approx(theirs.logprob, abs=1e-4)
        assert [v for _, v in mine.top] == pytest.approx([v for _, v in theirs.top], abs=1e-4)
    assert engine.stats.shared_prefills >= 2
    reference = transformers_model(directory)
    ids = engine.tokenizer(prompt)["input_ids"]
    with torch.inference_mode():
        for entry in plain.logprobs or ():
            values = torch.log_softmax(reference(torch.tensor([ids])).logits[0, -1], dim=-1)
            token = int(values.argmax())
            assert entry.token == engine.tokenizer.decode([token])
            assert entry.logprob == pytest.approx(float(values[token]), abs=1e-4)
            ids.append(token)
    long_prompt = " ".join([PROMPTS[1]] * 20)
    scored = engine.prompt_logprobs(long_prompt, 1).result(timeout=120)
    long_ids = engine.tokenizer(long_prompt)["input_ids"]
    assert len(long_ids) > SCORING_CHUNK and len(scored) == len(long_ids)
    with torch.inference_mode():
        values = torch.log_softmax(reference(torch.tensor([long_ids])).logits[0], dim=-1)
    for position, entry in enumerate(scored[1:]):
        assert entry.logprob == pytest.approx(
            float(values[position, long_ids[position + 1]]), abs=1e-4
        )


def mlp_outputs(directory: Path, ids: torch.Tensor) -> list[torch.Tensor]:
    """Each layer's MLP output for ``ids`` in fp32, ``[hidden]`` at the last token."""
    model = load_llama(directory, llama_config(directory), torch.float32, "cpu")
    outputs: list[torch.Tensor] = []
    for layer in model.model.layers:
        layer.mlp.register_forward_hook(lambda _m, _i, out: outputs.append(out[-1]))
    with torch.inference_mode():
        model(input_ids=ids)
    return outputs


def test_float16_keeps_the_residual_stream_finite(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    """Qwen2 checkpoints are reported to overflow fp16 in the residual stream
    (QwenLM/Qwen3#761). Here a Qwen2 checkpoint is scaled so that each of its
    two layers adds 40,000 to one channel, below fp16's largest number
    (65,504), but 80,000 together. transformers in fp16 gives NaN; the kit's
    decoder, whose residual stays fp32, gives finite logits with the fp32
    greedy token."""
    directory = tmp_path / "qwen2-loud"
    directory.mkdir()
    for file in checkpoints["qwen2"].iterdir():
        (directory / file.name).write_bytes(file.read_bytes())
    ids = torch.tensor([[7]])
    channel = int(mlp_outputs(directory, ids)[0].abs().argmax())
    for layer in range(2):  # layer by layer: scaling the first changes the second's input
        tensors = load_file(directory / "model.safetensors")
        name = f"model.layers.{layer}.mlp.down_proj.weight"
        tensors[name][channel] *= 40_000 / float(mlp_outputs(directory, ids)[layer][channel])
        save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    added = mlp_outputs(directory, ids)
    assert all(39_000 < float(out[channel]) < 41_000 for out in added)
    assert all(float(out.abs().max()) < 65_504 for out in added)

    config = llama_config(directory)
    with torch.inference_mode():
        transformers_fp16 = transformers_model(directory, torch.float16)(input_ids=ids).logits
        ours_fp32 = load_llama(directory, config, torch.float32, "cpu")(input_ids=ids).logits
        ours_fp16 = load_llama(directory, config, torch.float16, "cpu")(input_ids=ids).logits
    assert not torch.isfinite(transformers_fp16).all(), "the scaling did not overflow fp16"
    assert torch.isfinite(ours_fp16).all()
    assert torch.equal(ours_fp16.float().argmax(-1), ours_fp32.argmax(-1))
