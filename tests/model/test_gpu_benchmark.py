"""The GPU benchmark script, run on CPU so that it cannot rot unnoticed here."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.gpu_engine import (
    SHAPES,
    checkpoint_config,
    decode_step_ms,
    load_engine,
    same_text,
    write_checkpoint,
)
from helpers.engine.engine import Engine
from helpers.engine.layer_ops import LayerOps
from helpers.engine.llama_config import llama_config
from helpers.engine.tokenizer import Tokenizer
from tests.triton_interpreter import fused_layer_ops

REPO = Path(__file__).resolve().parents[2]


def test_the_gpu_benchmark_runs_its_random_weight_model_on_cpu() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.gpu_engine",
            "--device",
            "cpu",
            "--batches",
            "1",
            "2",
            "--max-tokens",
            "4",
            "--loop-requests",
            "1",
            "--check-prompts",
            "2",  # the 240-word prompts dominate the run on CPU
            "--layers",
            "4",  # the same code paths as 30 layers, in a fraction of the time
            "--nano-vllm-requests",
            "3",
            "--nano-vllm-lengths",
            "4",
            "12",
            "--long-prompt-words",
            "300",
            "--shared-prompt",
            "3x40",
            "--attention",
            "2x100",
            "--step-batches",
            "1",
            "3",
            "--step-positions",
            "40",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    ready = re.findall(r"ready ([\d.]+) s after a fresh process started", result.stdout)
    assert len(ready) == 2 and all(float(seconds) > 0 for seconds in ready)
    assert re.search(r"first token, one request on an idle engine: [\d.]+ ms", result.stdout)
    agree = re.search(r"same greedy text from slots and the padded cache: (\d) of 2", result.stdout)
    assert agree and int(agree.group(1)) == 2  # on CPU, in fp32, the layouts agree exactly
    grown = re.search(r"the same with long prompts \(240 words, .*: (\d) of 1", result.stdout)
    assert grown and int(grown.group(1)) == 1
    attention = r"one layer, 2 rows of 100 positions: .* not run here, .* ([\d.]+) ms$"
    assert re.search(attention, result.stdout, re.M)
    long_prompt = r"a 300-token prompt alone, prefilled in 1 pass: first token in [\d.]+ s"
    assert re.search(long_prompt, result.stdout)
    assert re.search(
        r"health checks during that pass, on another thread: \d+ passed$", result.stdout, re.M
    )
    assert re.search(r"walkthrough loop \(1 requests in turn\): [1-9]\d* tok/s", result.stdout)
    nano = re.search(
        r"nano-vllm's workload \(3 requests, .*: (\d+) tokens in .*; (\d+) forward passes, "
        r"0 step shapes first captured in them$",  # eager on CPU: no graphs
        result.stdout,
        re.M,
    )
    assert nano and 3 * 4 <= int(nano.group(1)) <= 3 * 12  # EOS ignored: every length in full
    assert 0 < int(nano.group(2)) < int(nano.group(1)), "three rows share their steps"
    again = r"^the same workload again: (\d+) tokens in .*, 0 step shapes first captured in them$"
    assert re.search(again, result.stdout, re.M)
    steps = re.findall(r"^\| (\d+) \| ([\d.]+) ms \| not run here \|$", result.stdout, re.M)
    assert [int(batch) for batch, _ in steps] == [1, 3] and all(float(ms) > 0 for _, ms in steps)
    streamed = r"^streamed, 2 sequences: [1-9]\d* tok/s, [\d.]+ ms per step$"
    assert re.search(streamed, result.stdout, re.M)
    rows = re.findall(r"^\| (\d+) \| (\d+) \| [\d.]+ \| [\d.]+x \|$", result.stdout, re.M)
    assert [int(batch) for batch, _ in rows] == [1, 2]
    assert all(int(tok_s) > 0 for _, tok_s in rows)
    burst = re.findall(
        r"^kept pages (on|off), 3 questions of 32 tokens after one 40-token system prompt, "
        r"at once: .* (\d+) of 216 prompt tokens found kept; (\d+) forward pass(es)?$",
        result.stdout,
        re.M,
    )
    # Kept: the system prompt's two full pages (32 tokens) for each question.
    assert [(on, int(kept)) for on, kept, *_ in burst] == [
        ("on", 3 * 32),
        ("off", 0),
        ("off", 0),
        ("on", 3 * 32),
    ]
    same = (
        r"^kept pages on and off, the same prompts: "
        r"the same greedy token for (\d) of 3 questions$"
    )
    assert re.findall(same, result.stdout, re.M) == ["3", "3"]  # fp32 on CPU: exactly


@pytest.mark.parametrize("shape", sorted(set(SHAPES) - {"smollm2-135m"}))
def test_each_family_shape_loads_and_decodes_as_the_benchmark_runs_it(
    shape: str, tmp_path: Path
) -> None:
    """The benchmark's checkpoint of each family, one layer deep: the kit's
    own decoder and tokenizer load it, as they load the real model, and the
    same prompt ids decode to the same words in both layouts. A Qwen2
    checkpoint's word-level tokenizer once came back from transformers as an
    empty BPE, which gave the benchmark empty prompts on that shape alone."""
    write_checkpoint(tmp_path, shape, layers=1)
    engine = load_engine(tmp_path, "cpu", max_batch_size=2)
    assert engine.info.implementation == "kit-decoder"
    assert isinstance(engine.tokenizer, Tokenizer)
    assert engine.tokenizer.decode([5, 7]).split() == ["w5", "w7"]
    padded = Engine(engine.model, engine.tokenizer, model_id="padded", slots=False)
    assert same_text(engine, padded, count=2, tokens=4) == 2
    # The decode-step comparison, the fused steps in Triton's interpreter.
    (plain_ms, plain), (fused_ms, fused) = (
        decode_step_ms(engine, 2, 40, ops, steps=1) for ops in (LayerOps(), fused_layer_ops([]))
    )
    assert plain_ms > 0 and fused_ms > 0
    assert plain.shape == (2, engine.model.config.vocab_size)
    torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-4)
    assert type(engine.model.ops) is LayerOps, "the engine's own steps are put back"


@pytest.mark.parametrize("shape", sorted(set(SHAPES) - {"smollm2-135m"}))
def test_each_family_shape_is_one_the_kits_decoder_runs(shape: str, tmp_path: Path) -> None:
    """Qwen2.5-0.5B, Qwen3-0.6B and Llama-3.2-1B as the GPU benchmark
    configures them: the kit's Llama reads each, its family's parts included,
    rather than leaving it to transformers. Their weights are transformers'
    own models of that family, which tests/model/test_families.py holds the
    kit's decoder to; the run above writes and decodes one."""
    checkpoint_config(shape, layers=1).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").touch()  # the config is what is read here
    config = llama_config(tmp_path)
    expected = SHAPES[shape]
    head_dim = expected.get("head_dim", expected["hidden_size"] // expected["num_attention_heads"])
    assert (config.family, config.hidden_size, config.head_dim, config.vocab_size) == (
        expected["model_type"],
        expected["hidden_size"],
        head_dim,
        expected["vocab_size"],
    )
    parts = (config.qkv_bias, config.qk_norm, config.rope_scaling.kind)
    assert (
        parts
        == {
            "qwen2.5-0.5b": (True, False, "default"),
            "qwen3-0.6b": (False, True, "default"),
            "llama3.2-1b": (False, False, "llama3"),
        }[shape]
    )
