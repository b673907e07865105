"""The OpenAI-compatible API through the official ``openai`` client, on a real
local Ray cluster with the embedded model, plus raw HTTP for the SSE framing.

Tests run in file order; the first one meets the model at zero replicas.
Next, on the same deployment, the kit's metrics: Ray's metrics-export port
scraped before and after known requests, and the cold start the first test
caused; then request ids, in responses and in the replica's JSON log.
"""

import asyncio
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import httpx
import openai
import pydantic
import pytest

from helpers.config import ServeConfig
from helpers.engine.engine import load_tokenizer
from helpers.notebook.metrics import Scrape, scrape, settled_scrape, wait_for_total
from helpers.notebook.polling import wait_for

from .conftest import BASE_URL, batch_stats, model_replicas_running

COLOURS = [{"role": "user", "content": "Name three colours."}]
COUNTING = "Count from one to twenty: one, two, three,"


@pytest.fixture(scope="module")
def test_config() -> ServeConfig:
    """One replica at most, so batching is observable, and a long idle timeout
    so the model stays up between tests once the first one woke it."""
    return ServeConfig.from_env(
        {
            **os.environ,
            "MAX_REPLICAS": "1",
            "MAX_NEW_TOKENS": "64",
            "MAX_PROMPTS": "4",
            "RAY_SERVE_AUTOSCALER_IDLE_TIMEOUT_S": "120",
        }
    )


@pytest.fixture(scope="module")
def before_any_request(deployed_app: ServeConfig) -> Scrape:
    """The metrics before the module's first request, which starts the model."""
    return scrape()


@pytest.fixture(scope="module")
def model(deployed_app: ServeConfig) -> str:
    return deployed_app.model_id


@pytest.fixture(scope="module")
def client(deployed_app: ServeConfig) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{BASE_URL}/v1", api_key="unused", max_retries=0) as client:
        yield client


@pytest.fixture(scope="module")
def tokenizer(deployed_app: ServeConfig):
    return load_tokenizer(deployed_app.model_id, deployed_app.model_cache_dir)


def json_schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}


def streamed_chat(client: openai.OpenAI, model: str, **kwargs) -> tuple[str, list]:
    chunks = list(client.chat.completions.create(model=model, stream=True, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


def test_a_stream_at_zero_replicas_waits_for_the_cold_start(
    client: openai.OpenAI, model: str, before_any_request: Scrape
) -> None:
    assert model_replicas_running() == 0
    text, chunks = streamed_chat(client, model, messages=COLOURS, max_tokens=8, temperature=0)
    assert text.strip()
    assert chunks[-1].choices[0].finish_reason in {"stop", "length"}
    assert model_replicas_running() == 1


COLD_START_PHASES = ("process", "imports", "tokenizer", "weights", "warm_up", "total")


def completion(http: httpx.Client, model: str, **body) -> httpx.Response:
    body = {"model": model, "prompt": "Once upon a time", "max_tokens": 6, **body}
    return http.post("/v1/completions", json={"temperature": 0, **body})


def grown(before: Scrape, name: str, by: float, **labels: str) -> float:
    """How much ``name`` grew since ``before``, once it grew by ``by`` (Ray
    reports every few seconds, so a count is waited for, then checked)."""
    start = before.total(name, **labels)
    with_timeout = wait_for_total(name, start + by, timeout_s=60, **labels)
    return with_timeout.total(name, **labels) - start


def test_the_metrics_count_exactly_what_was_sent_and_the_cold_start(
    deployed_app: ServeConfig, before_any_request: Scrape
) -> None:
    model = deployed_app.model_id
    before = settled_scrape()
    with httpx.Client(base_url=BASE_URL, timeout=120) as http:
        whole = [completion(http, model).json() for _ in range(2)]
        streamed = http.post(
            "/v1/chat/completions",
            json={
                "model": model,
                "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 5,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
        )
        refused = [completion(http, model, max_tokens=-1), completion(http, "not-this-model")]
    assert [r.status_code for r in refused] == [400, 404]
    usage = [reply["usage"] for reply in whole]
    usage.append(json.loads(streamed.text.split("data: ")[-2])["usage"])

    requests = "ray_llm_requests_total"
    assert grown(before, requests, 2, endpoint="/v1/completions", outcome="completed") == 2
    assert grown(before, requests, 1, endpoint="/v1/chat/completions", outcome="completed") == 1
    assert grown(before, requests, 2, endpoint="/v1/completions", outcome="client_error") == 2
    errors = "ray_llm_errors_total"
    assert grown(before, errors, 1, status="400", type="invalid_request_error") == 1
    assert grown(before, errors, 1, status="404", type="not_found_error") == 1

    for kind in ("prompt_tokens", "completion_tokens"):
        sent = sum(u[kind] for u in usage)
        assert grown(before, f"ray_llm_{kind}_total", sent) == sent
    assert grown(before, "ray_llm_time_to_first_token_seconds_count", 3) == 3
    assert grown(before, "ray_llm_e2e_request_latency_seconds_count", 3) == 3

    assert grown(before_any_request, "ray_llm_cold_starts_total", 1) == 1
    for phase in COLD_START_PHASES:
        assert grown(before_any_request, "ray_llm_cold_start_seconds_count", 1, phase=phase) == 1


def test_a_chats_next_turn_reports_the_prompt_tokens_the_prefix_cache_held(
    client: openai.OpenAI, model: str
) -> None:
    """This module's one replica meets the second turn with the first's
    cache: the client reads it as OpenAI's ``cached_tokens``, and the
    replica's counter grows by as much."""
    before = settled_scrape()
    system = {"role": "system", "content": f"Answer in one short sentence. {uuid.uuid4()} " * 8}
    turn = [system, *COLOURS]
    first = client.chat.completions.create(model=model, messages=turn, max_tokens=8, temperature=0)
    turn += [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "Name three more."},
    ]
    second = client.chat.completions.create(model=model, messages=turn, max_tokens=8, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert first.usage.prompt_tokens <= cached < second.usage.prompt_tokens
    assert grown(before, "ray_llm_prompt_tokens_cached_total", cached) == cached


def test_every_response_carries_its_request_id_and_so_does_the_replica_log(
    deployed_app: ServeConfig,
) -> None:
    mine = f"metrics-test-{uuid.uuid4().hex}"
    with httpx.Client(base_url=BASE_URL, timeout=120) as http:
        answered = completion(http, deployed_app.model_id)
        refused = http.post(
            "/v1/completions",
            json={"model": deployed_app.model_id, "prompt": "x", "top_p": 7},
            headers={"x-request-id": f"{mine}-refused"},
        )
        served = http.post(
            "/v1/completions",
            json={"model": deployed_app.model_id, "prompt": "x", "max_tokens": 2},
            headers={"x-request-id": mine},
        )
    assert answered.headers.get("x-request-id")  # Serve made one up
    assert refused.status_code == 400
    assert refused.headers["x-request-id"] == f"{mine}-refused"
    assert refused.json()["error"]["request_id"] == f"{mine}-refused"
    assert served.status_code == 200 and served.headers["x-request-id"] == mine

    logs = Path("/tmp/ray/session_latest/logs/serve").glob("replica_*LLMServer*.log")
    lines = [json.loads(line) for log in logs for line in log.read_text().splitlines()]
    about_mine = [line for line in lines if line.get("request_id") == mine]
    assert about_mine, "no JSON line of the model replica's log names the request's id"


def test_models_lists_the_served_model(client: openai.OpenAI, model: str) -> None:
    assert [m.id for m in client.models.list()] == [model]
    assert client.models.retrieve(model).id == model
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


@pytest.mark.parametrize("kind", ["chat", "completions"])
def test_streamed_text_equals_the_whole_text_at_temperature_0(
    client: openai.OpenAI, model: str, kind: str
) -> None:
    if kind == "chat":
        whole = (
            client.chat.completions.create(
                model=model, messages=COLOURS, max_tokens=24, temperature=0
            )
            .choices[0]
            .message.content
        )
        streamed, _ = streamed_chat(client, model, messages=COLOURS, max_tokens=24, temperature=0)
    else:
        args = {"model": model, "prompt": COUNTING, "max_tokens": 24, "temperature": 0}
        whole = client.completions.create(**args).choices[0].text
        streamed = "".join(
            c.choices[0].text for c in client.completions.create(stream=True, **args)
        )
    assert whole and streamed == whole


def test_max_tokens_ends_with_length_and_usage_counts_tokens(
    client: openai.OpenAI, model: str, tokenizer
) -> None:
    reply = client.completions.create(model=model, prompt=COUNTING, max_tokens=5, temperature=0)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 5
    assert reply.usage.prompt_tokens == len(tokenizer(COUNTING)["input_ids"])
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 5
    assert len(tokenizer(reply.choices[0].text, add_special_tokens=False)["input_ids"]) <= 6


def test_max_completion_tokens_limits_a_chat(client: openai.OpenAI, model: str) -> None:
    reply = client.chat.completions.create(
        model=model, messages=COLOURS, max_completion_tokens=3, temperature=0
    )
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 3


def test_a_stop_string_ends_the_text_before_it(client: openai.OpenAI, model: str) -> None:
    args = {"model": model, "prompt": COUNTING, "max_tokens": 24, "temperature": 0}
    free = client.completions.create(**args).choices[0].text
    stop = free.split(",")[2] + ","  # e.g. " six,"
    stopped = client.completions.create(stop=[stop, "never appears"], **args).choices[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == free[: free.index(stop)]
    streamed = client.completions.create(stop=stop, stream=True, **args)
    assert "".join(c.choices[0].text for c in streamed) == stopped.text


def test_the_same_seed_gives_the_same_text(client: openai.OpenAI, model: str) -> None:
    def sample(seed: int) -> str:
        return (
            client.chat.completions.create(
                model=model, messages=COLOURS, max_tokens=16, temperature=1.0, seed=seed
            )
            .choices[0]
            .message.content
        )

    assert sample(11) == sample(11)
    assert len({sample(seed) for seed in (1, 2, 3)}) > 1


def test_a_seeded_request_gives_its_text_alone_and_among_other_settings(model: str) -> None:
    """Through the server: its neighbours in the batch sample with other
    controls, and its own text does not move."""
    mine = {"prompt": COUNTING, "temperature": 1.0, "seed": 8, "extra_body": {"top_k": 20}}
    others = [
        {"prompt": "Hi", "temperature": 0.7, "seed": 1, "frequency_penalty": 1.5},
        {"prompt": COUNTING, "temperature": 0, "logit_bias": {"28": -100}},
        {
            "prompt": "Ray",
            "temperature": 1.2,
            "extra_body": {"min_p": 0.2, "repetition_penalty": 1.4},
        },
    ]

    async def replies(requests: list[dict]) -> list:
        async with openai.AsyncOpenAI(base_url=f"{BASE_URL}/v1", api_key="unused") as client:
            return await asyncio.gather(
                *(client.completions.create(model=model, max_tokens=12, **r) for r in requests)
            )

    alone = asyncio.run(replies([mine]))[0].choices[0].text
    passes = batch_stats()["forward_passes"]
    together = asyncio.run(replies([mine, *others]))
    assert together[0].choices[0].text == alone
    tokens = sum(reply.usage.completion_tokens for reply in together)
    assert batch_stats()["forward_passes"] - passes < tokens, "they shared batches"


def test_include_usage_adds_a_last_chunk_with_the_usage(client: openai.OpenAI, model: str) -> None:
    _, chunks = streamed_chat(
        client,
        model,
        messages=COLOURS,
        max_tokens=6,
        temperature=0,
        stream_options={"include_usage": True},
    )
    whole = client.chat.completions.create(
        model=model, messages=COLOURS, max_tokens=6, temperature=0
    )
    assert chunks[-1].choices == []
    assert chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])


def test_a_list_of_prompts_gets_one_choice_each(client: openai.OpenAI, model: str) -> None:
    prompts = ["The capital of France is", COUNTING]
    reply = client.completions.create(model=model, prompt=prompts, max_tokens=6, temperature=0)
    alone = [
        client.completions.create(model=model, prompt=p, max_tokens=6, temperature=0)
        .choices[0]
        .text
        for p in prompts
    ]
    assert [c.index for c in reply.choices] == [0, 1]
    assert [c.text for c in reply.choices] == alone


def test_top_k_one_through_the_client_gives_the_greedy_text(
    client: openai.OpenAI, model: str
) -> None:
    """vLLM's ``top_k`` goes in ``extra_body``, as with vLLM."""
    args = {"model": model, "prompt": COUNTING, "max_tokens": 12}
    greedy = client.completions.create(temperature=0, **args).choices[0].text
    top_one = client.completions.create(temperature=1.5, seed=4, extra_body={"top_k": 1}, **args)
    assert top_one.choices[0].text == greedy


def test_logit_bias_and_penalties_stream_as_they_answer_whole(
    client: openai.OpenAI, model: str, tokenizer
) -> None:
    """The client's own ``logit_bias`` and ``frequency_penalty``: a banned
    token never appears, and the streamed text is the whole text."""
    comma = tokenizer(",", add_special_tokens=False)["input_ids"][0]
    args = {
        "messages": COLOURS,
        "max_tokens": 24,
        "temperature": 0,
        "logit_bias": {str(comma): -100},
        "frequency_penalty": 0.5,
    }
    whole = client.chat.completions.create(model=model, **args).choices[0].message.content
    plain = client.chat.completions.create(
        model=model, messages=COLOURS, max_tokens=24, temperature=0
    )
    assert "," in plain.choices[0].message.content and "," not in whole
    streamed, _ = streamed_chat(client, model, **args)
    assert streamed == whole


def test_async_stop_token_ids_and_ignore_eos(model: str, tokenizer) -> None:
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"][0]

    async def both() -> tuple[openai.types.Completion, openai.types.Completion]:
        async with openai.AsyncOpenAI(base_url=f"{BASE_URL}/v1", api_key="unused") as client:
            args = {"model": model, "max_tokens": 16, "temperature": 0}
            stopped = client.completions.create(
                prompt="List three colours:\n1.", extra_body={"stop_token_ids": [newline]}, **args
            )
            endless = client.completions.create(
                prompt="Hi", extra_body={"ignore_eos": True}, **args
            )
            return await asyncio.gather(stopped, endless)

    stopped, endless = asyncio.run(both())
    assert stopped.choices[0].finish_reason == "stop" and "\n" not in stopped.choices[0].text
    assert endless.choices[0].finish_reason == "length"
    assert endless.usage.completion_tokens == 16


def test_tokenize_counts_what_the_model_reads(model: str, tokenizer) -> None:
    """vLLM's shapes; the chat form counts the template around the messages."""
    reply = httpx.post(f"{BASE_URL}/tokenize", json={"model": model, "prompt": COUNTING})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["tokens"] == tokenizer(COUNTING)["input_ids"] and body["count"] == len(
        body["tokens"]
    )
    assert body["max_model_len"] == 8192
    chat = httpx.post(f"{BASE_URL}/tokenize", json={"model": model, "messages": COLOURS}).json()
    rendered = tokenizer.apply_chat_template(COLOURS, add_generation_prompt=True, tokenize=False)
    assert chat["tokens"] == tokenizer(rendered)["input_ids"]
    back = httpx.post(f"{BASE_URL}/detokenize", json={"model": model, "tokens": body["tokens"]})
    assert back.status_code == 200 and back.json() == {"prompt": COUNTING}


def test_a_prompt_sent_as_token_ids_gets_the_answer_its_text_gets(
    client: openai.OpenAI, model: str, tokenizer
) -> None:
    """The client sends ``prompt`` as a list of ints, or a list of such lists."""
    ids = tokenizer(COUNTING)["input_ids"]
    args = {"model": model, "max_tokens": 10, "temperature": 0}
    as_text = client.completions.create(prompt=COUNTING, **args)
    as_ids = client.completions.create(prompt=ids, **args)
    assert as_ids.choices[0].text == as_text.choices[0].text
    assert as_ids.usage.prompt_tokens == len(ids)
    both = client.completions.create(prompt=[ids, tokenizer("Hi")["input_ids"]], **args)
    assert [c.index for c in both.choices] == [0, 1]
    assert both.choices[0].text == as_text.choices[0].text


def test_chat_logprobs_stream_as_they_answer_whole(client: openai.OpenAI, model: str) -> None:
    args = {"messages": COLOURS, "max_tokens": 12, "temperature": 0, "logprobs": True}
    whole = client.chat.completions.create(model=model, top_logprobs=2, **args).choices[0]
    entries = whole.logprobs.content
    assert len(entries) == 12 and "".join(e.token for e in entries) == whole.message.content
    assert all(e.top_logprobs[0].token == e.token and len(e.top_logprobs) == 2 for e in entries)
    assert all(e.logprob <= 0 and bytes(e.bytes).decode() == e.token for e in entries)
    _, chunks = streamed_chat(client, model, top_logprobs=2, **args)
    streamed = [
        e
        for c in chunks
        if c.choices and c.choices[0].logprobs
        for e in c.choices[0].logprobs.content
    ]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in entries]


def test_completion_logprobs_list_the_alternatives(client: openai.OpenAI, model: str) -> None:
    reply = client.completions.create(
        model=model, prompt=COUNTING, max_tokens=6, temperature=0, logprobs=2
    )
    logprobs = reply.choices[0].logprobs
    assert "".join(logprobs.tokens) == reply.choices[0].text
    assert len(logprobs.token_logprobs) == 6 and all(lp <= 0 for lp in logprobs.token_logprobs)
    assert [len(top) for top in logprobs.top_logprobs] == [2] * 6
    assert logprobs.text_offset[0] == 0 and logprobs.text_offset[1] == len(logprobs.tokens[0])


def test_echo_scores_the_prompt_as_an_independent_model_does(
    client: openai.OpenAI, model: str, deployed_app: ServeConfig, tokenizer
) -> None:
    """How evaluation harnesses score a text: ``echo`` with ``max_tokens: 0``
    and ``logprobs``, held to transformers' own model on the same weights."""
    import torch
    from transformers import AutoModelForCausalLM

    from helpers.engine.embedded_model import converted_dir

    text = "The capital of France is Paris."
    reply = client.completions.create(
        model=model, prompt=text, max_tokens=0, echo=True, logprobs=1, temperature=0
    )
    choice = reply.choices[0]
    assert choice.text == text and reply.usage.completion_tokens == 0
    ids = tokenizer(text)["input_ids"]
    assert reply.usage.prompt_tokens == len(ids)
    assert choice.logprobs.tokens == [tokenizer.decode([i]) for i in ids]
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
    reference = AutoModelForCausalLM.from_pretrained(converted_dir(deployed_app.model_cache_dir))
    with torch.inference_mode():
        logits = reference(torch.tensor([ids])).logits[0].float()
    expected = torch.log_softmax(logits, dim=-1)
    assert len(choice.logprobs.token_logprobs) == len(ids)  # every token scored, none skipped
    for position, logprob in enumerate(choice.logprobs.token_logprobs[1:]):
        assert logprob == pytest.approx(float(expected[position, ids[position + 1]]), abs=2e-3)
    echoed = client.completions.create(
        model=model, prompt=ids, max_tokens=4, echo=True, temperature=0
    )
    plain = client.completions.create(model=model, prompt=text, max_tokens=4, temperature=0)
    assert echoed.choices[0].text == text + plain.choices[0].text
    streamed = client.completions.create(
        model=model, prompt=text, max_tokens=4, echo=True, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == echoed.choices[0].text


def test_n_choices_share_one_prefill_and_count_the_prompt_once(
    client: openai.OpenAI, model: str
) -> None:
    before = batch_stats()["shared_prefills"]
    args = {"model": model, "prompt": COUNTING, "max_tokens": 8, "temperature": 1.0, "n": 3}
    reply = client.completions.create(seed=5, **args)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    texts = [c.text for c in reply.choices]
    assert len(set(texts)) > 1, "each choice samples with its own seed"
    assert [c.text for c in client.completions.create(seed=5, **args).choices] == texts
    assert batch_stats()["shared_prefills"] >= before + 4
    alone = client.completions.create(model=model, prompt=COUNTING, max_tokens=1)
    assert reply.usage.prompt_tokens == alone.usage.prompt_tokens
    assert 8 < reply.usage.completion_tokens <= 3 * 8, "every choice's tokens counted"


def test_n_choices_stream_side_by_side(client: openai.OpenAI, model: str) -> None:
    args = {"messages": COLOURS, "max_tokens": 6, "temperature": 0, "n": 2}
    whole = client.chat.completions.create(model=model, **args)
    texts = [c.message.content for c in whole.choices]
    assert texts[0] == texts[1], "greedy: both choices alike"
    _, chunks = streamed_chat(client, model, **args)
    by_index = {0: "", 1: ""}
    for chunk in chunks:
        for choice in chunk.choices:
            by_index[choice.index] += choice.delta.content or ""
    assert [by_index[0], by_index[1]] == texts


BAD_CALLS = [
    pytest.param({"model": "gpt-4o"}, openai.NotFoundError, "model", id="unknown model"),
    pytest.param({"n": 9}, openai.BadRequestError, "n", id="n above 8"),
    pytest.param(
        {"n": 8, "max_tokens": 64, "prompt": ["a", "b"]},
        openai.BadRequestError,
        "n",
        id="past the token budget",
    ),
    pytest.param({"temperature": 3}, openai.BadRequestError, "temperature", id="hot"),
    pytest.param({"top_p": 1.5}, openai.BadRequestError, "top_p", id="top_p"),
    pytest.param(
        {"max_tokens": 65}, openai.BadRequestError, "max_tokens", id="over MAX_NEW_TOKENS"
    ),
    pytest.param({"stop": list("abcde")}, openai.BadRequestError, "stop", id="five stops"),
    pytest.param({"prompt": "word " * 9000}, openai.BadRequestError, "prompt", id="too long"),
    pytest.param({"extra_body": {"best_of": 3}}, openai.BadRequestError, "best_of", id="unknown"),
    pytest.param(
        {"logit_bias": {"49152": 5}}, openai.BadRequestError, "logit_bias", id="bias off vocab"
    ),
    pytest.param(
        {"extra_body": {"stop_token_ids": [10**6]}},
        openai.BadRequestError,
        "stop_token_ids",
        id="stop id off vocab",
    ),
    pytest.param({"extra_body": {"top_k": -5}}, openai.BadRequestError, "top_k", id="top_k"),
    pytest.param({"logprobs": 6}, openai.BadRequestError, "logprobs", id="six logprobs"),
    pytest.param({"max_tokens": 0}, openai.BadRequestError, "max_tokens", id="0 without echo"),
    pytest.param({"presence_penalty": 2.5}, openai.BadRequestError, "presence_penalty", id="pp"),
    pytest.param(
        {"prompt": "word " * 9000, "stream": True},
        openai.BadRequestError,
        "prompt",
        id="too long, streamed",
    ),
    pytest.param(
        {"extra_body": {"response_format": json_schema_format({"type": "nonsense"})}},
        openai.BadRequestError,
        "response_format",
        id="schema the grammar refuses",
    ),
]


class Person(pydantic.BaseModel):
    name: str
    age: int


PERSON_CHAT = [{"role": "user", "content": "Invent a person: name and age."}]


def test_structured_output_parses_into_the_clients_own_class(
    client: openai.OpenAI, model: str
) -> None:
    """The openai client's typed helper, whole and streamed: what it parses is
    a ``Person``, and the stream gives the same text as the whole reply."""
    args = {"model": model, "messages": PERSON_CHAT, "response_format": Person, "temperature": 0}
    whole = client.chat.completions.parse(**args).choices[0]
    assert whole.finish_reason == "stop"
    assert isinstance(whole.message.parsed, Person)
    with client.chat.completions.stream(**args) as stream:
        streamed = stream.get_final_completion().choices[0]
    assert streamed.message.parsed == whole.message.parsed
    assert streamed.message.content == whole.message.content


def test_async_json_mode_gives_objects_on_both_endpoints(model: str) -> None:
    json_mode = {"type": "json_object"}

    async def both() -> tuple[Any, Any]:
        async with openai.AsyncOpenAI(base_url=f"{BASE_URL}/v1", api_key="unused") as client:
            chat = client.chat.completions.create(
                model=model, messages=PERSON_CHAT, response_format=json_mode, temperature=0
            )
            completion = client.completions.create(
                model=model,
                prompt="A person as JSON:",
                extra_body={"response_format": json_mode},
                temperature=0,
            )
            return await asyncio.gather(chat, completion)

    chat, completion = (reply.choices[0] for reply in asyncio.run(both()))
    for text, reason in (
        (chat.message.content, chat.finish_reason),
        (completion.text, completion.finish_reason),
    ):
        assert reason == "stop", text
        assert isinstance(json.loads(text or ""), dict)


class Weather(pydantic.BaseModel):
    city: str
    unit: Literal["C", "F"]


WEATHER_TOOL = openai.pydantic_function_tool(Weather, name="get_weather")
WEATHER_CHAT = [{"role": "user", "content": "What is the weather in Paris?"}]


def test_a_named_tool_call_parses_into_the_clients_own_class(
    client: openai.OpenAI, model: str
) -> None:
    """Whole and streamed, the call's arguments come back as a ``Weather``."""
    args = {
        "model": model,
        "messages": WEATHER_CHAT,
        "tools": [WEATHER_TOOL],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "parallel_tool_calls": False,
        "temperature": 0,
    }
    whole = client.chat.completions.parse(**args).choices[0]
    assert whole.finish_reason == "tool_calls"
    (call,) = whole.message.tool_calls or []
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    assert isinstance(call.function.parsed_arguments, Weather)
    with client.chat.completions.stream(**args) as stream:
        streamed = stream.get_final_completion().choices[0]
    assert streamed.finish_reason == "tool_calls"
    (again,) = streamed.message.tool_calls or []
    assert again.function.parsed_arguments == call.function.parsed_arguments


def test_async_a_required_call_then_its_answer_continue_the_chat(model: str, tokenizer) -> None:
    """The conversation goes on from the call: its answer, as a tool turn, is
    read and the model replies in text. ``/tokenize`` counts the prompt with
    its tools as the reply's usage does."""

    async def chat() -> tuple[Any, Any]:
        async with openai.AsyncOpenAI(base_url=f"{BASE_URL}/v1", api_key="unused") as client:
            asked = await client.chat.completions.create(
                model=model,
                messages=WEATHER_CHAT,
                tools=[WEATHER_TOOL],
                tool_choice="required",
                temperature=0,
                max_tokens=64,
            )
            call = (asked.choices[0].message.tool_calls or [])[0]
            answered = await client.chat.completions.create(
                model=model,
                messages=[
                    *WEATHER_CHAT,
                    asked.choices[0].message.model_dump(exclude_none=True),
                    {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'},
                ],
                tools=[WEATHER_TOOL],
                tool_choice="none",
                temperature=0,
                max_tokens=16,
            )
            asked_usage.append(asked.usage.prompt_tokens)
            return asked.choices[0], answered.choices[0]

    asked_usage: list[int] = []
    asked, answered = asyncio.run(chat())
    assert asked.message.tool_calls and asked.message.content is None
    counted = httpx.post(
        f"{BASE_URL}/tokenize",
        json={"model": model, "messages": WEATHER_CHAT, "tools": [WEATHER_TOOL]},
    ).json()
    assert (
        counted["count"] == asked_usage[0] > len(tokenizer(WEATHER_CHAT[0]["content"])["input_ids"])
    )
    for call in asked.message.tool_calls:
        Weather.model_validate_json(call.function.arguments)
    assert answered.message.tool_calls is None and answered.message.content


def test_langchain_reads_structured_output_and_tool_calls(model: str) -> None:
    """A second widely used client: LangChain's OpenAI chat model, whose
    ``with_structured_output`` sends a ``json_schema`` and whose
    ``bind_tools`` a named tool choice."""
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        base_url=f"{BASE_URL}/v1", api_key="unused", model=model, temperature=0, max_tokens=64
    )
    structured = llm.with_structured_output(Person)
    person = structured.invoke("Invent a person: name and age.")
    assert isinstance(person, Person)
    assert list(structured.stream("Invent a person: name and age."))[-1] == person
    message = llm.bind_tools([Weather], tool_choice="Weather").invoke("Weather in Rome?")
    (call,) = message.tool_calls
    assert call["name"] == "Weather"
    Weather.model_validate(call["args"])


@pytest.mark.parametrize(
    ("tools", "choice", "param"),
    [
        (
            [{"type": "function", "function": {"name": "f", "parameters": {"type": 7}}}],
            "auto",
            "tools",
        ),
        ([WEATHER_TOOL], {"type": "function", "function": {"name": "other"}}, "tool_choice"),
    ],
    ids=["parameters the grammar refuses", "choice of no tool"],
)
def test_a_malformed_tool_is_refused_by_name(
    client: openai.OpenAI, model: str, tools: list, choice: Any, param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=model, messages=WEATHER_CHAT, tools=tools, tool_choice=choice
        )
    assert caught.value.body["param"] == param


@pytest.mark.parametrize(("override", "error", "param"), BAD_CALLS)
def test_bad_parameters_raise_the_clients_own_errors(
    client: openai.OpenAI, model: str, override: dict, error: type, param: str
) -> None:
    args = {"model": model, "prompt": "Hi", "max_tokens": 4, **override}
    with pytest.raises(error) as caught:
        client.completions.create(**args)
    assert caught.value.body["param"] == param
    assert "Traceback" not in caught.value.message


def test_sse_framing_on_the_wire(model: str) -> None:
    body = {"model": model, "messages": COLOURS, "max_tokens": 6, "stream": True}
    with httpx.stream("POST", f"{BASE_URL}/v1/chat/completions", json=body, timeout=120) as reply:
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/event-stream")
        raw = reply.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: {") for e in events[:-2])
    assert payloads[0]["choices"][0]["delta"]["role"] == "assistant"
    assert payloads[-1]["choices"][0]["finish_reason"] in {"stop", "length"}


def test_generate_streams_when_asked(deployed_app: ServeConfig) -> None:
    body = {
        "prompt": "Name a colour.",
        "generation_kwargs": {"max_new_tokens": 12, "temperature": 0},
    }
    whole = httpx.post(f"{BASE_URL}/generate", json=body, timeout=120).json()["completions"][0]
    with httpx.stream(
        "POST", f"{BASE_URL}/generate", json={**body, "stream": True}, timeout=120
    ) as reply:
        lines = [line for line in reply.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert "".join(e["text"] for e in events) == whole
    assert events[-1]["finish_reason"] in {"stop", "length"} and events[-1]["completion_tokens"] > 0


def test_concurrent_async_streams_share_batches(model: str) -> None:
    async def one_stream(client: openai.AsyncOpenAI, index: int) -> str:
        stream = await client.completions.create(
            model=model, prompt=f"{COUNTING} ({index})", max_tokens=12, temperature=0, stream=True
        )
        return "".join([c.choices[0].text async for c in stream])

    async def four_streams() -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{BASE_URL}/v1", api_key="unused") as client:
            return await asyncio.gather(*(one_stream(client, i) for i in range(4)))

    before = batch_stats()
    texts = asyncio.run(four_streams())
    after = batch_stats()
    assert all(texts)
    assert after["sequences"] - before["sequences"] == 4
    assert after["forward_passes"] - before["forward_passes"] < (
        after["generated_tokens"] - before["generated_tokens"]
    )


def test_a_client_that_disconnects_stops_only_its_own_generation(model: str) -> None:
    """The leaver asks for the most tokens the deployment allows and ignores
    the end-of-sequence token, so it cannot end on its own before its
    disconnect is noticed (unless 63 decode steps beat that); the stayer's 32
    are exact, so the tokens generated show how far the leaver got."""
    before = batch_stats()
    body = {
        "model": model,
        "prompt": COUNTING,
        "max_tokens": 64,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.Client(timeout=120) as http:
        with http.stream("POST", f"{BASE_URL}/v1/completions", json=body) as leaver:
            stayer = http.build_request(
                "POST", f"{BASE_URL}/v1/completions", json={**body, "max_tokens": 32}
            )
            stayer_reply = http.send(stayer, stream=True)
            lines = leaver.iter_lines()
            while not next(lines).startswith("data: {"):
                pass
        # The leaver's connection is closed; the other stream goes on to its end.
        rest = [line for line in stayer_reply.iter_lines() if line]
        stayer_reply.close()
    assert rest[-1] == "data: [DONE]"
    finish = json.loads(rest[-2].removeprefix("data: "))["choices"][0]["finish_reason"]
    assert finish in {"stop", "length"}
    wait_for(lambda: batch_stats()["cancelled"] > before["cancelled"], 30, "the cancellation")
    after = batch_stats()
    assert after["cancelled"] - before["cancelled"] == 1
    assert after["sequences"] - before["sequences"] == 2
    # The stayer's 32 tokens and fewer than the leaver's 64.
    assert 32 < after["generated_tokens"] - before["generated_tokens"] < 32 + 64
