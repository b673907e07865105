"""Structured output and tool calls on the real embedded model: a grammar
holds every token, so the text parses and the schema accepts it, greedy or
sampled, alone or among unconstrained rows. On the padded layout alone: the grammar acts in the
sampler, which both layouts share."""

from __future__ import annotations

import json
from dataclasses import replace

import jsonschema
import pytest

from helpers.api.tool_calls import split_tool_calls
from helpers.engine.engine import Engine, Grammar, GrammarError, Sampling
from helpers.engine.grammar import Grammars
from helpers.protocol import Function, Message

from .conftest import padded_only

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "colour": {"enum": ["red", "green", "blue"]},
        "hobbies": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
    },
    "required": ["name", "age", "colour", "hobbies"],
    "additionalProperties": False,
}
ASK = "Describe a fictional person as JSON: name, age, favourite colour and hobbies."
GREEDY = Sampling(64, temperature=0.0, top_p=1.0)


def chat(engine: Engine, text: str) -> str:
    return engine.render_chat([{"role": "user", "content": text}])


def held_to(schema: dict) -> Grammar:
    return Grammar(json.dumps(schema))


@padded_only
def test_greedy_output_parses_against_the_schema_and_leaves_free_rows_alone(
    engine: Engine,
) -> None:
    """A free row's text is the same beside a constrained one as alone; the
    constrained one is valid, which the same prompt without it is not."""
    constrained = engine.request(chat(engine, ASK), replace(GREEDY, grammar=held_to(PERSON)))
    free = engine.request(chat(engine, ASK), replace(GREEDY, max_new_tokens=40))
    alone = engine.generate([free])[0]
    held, beside = engine.generate([constrained, free])
    assert beside.text == alone.text
    assert held.finish_reason == "stop"
    jsonschema.validate(json.loads(held.text), PERSON)
    with pytest.raises((ValueError, jsonschema.ValidationError)):
        jsonschema.validate(json.loads(alone.text), PERSON)


@padded_only
def test_one_checked_request_holds_each_of_its_sequences_from_the_start(engine: Engine) -> None:
    """The grammar is compiled once, when the request is checked; each
    sequence gets a matcher of its own, so two of them do not share a state."""
    request = engine.request(
        chat(engine, ASK), replace(GREEDY, max_new_tokens=12, grammar=held_to(PERSON))
    )
    assert request.grammar is not None
    first, second = engine.generate([request, request])
    assert first.text == second.text
    assert first.text.startswith('{"name": "')


@padded_only
def test_sampled_outputs_all_parse_whatever_the_seed(engine: Engine) -> None:
    sampled = Sampling(64, temperature=1.0, top_p=1.0, grammar=held_to(PERSON))
    requests = [engine.request(chat(engine, ASK), replace(sampled, seed=s)) for s in range(4)]
    completions = engine.generate(requests)
    for completion in completions:
        assert completion.finish_reason == "stop"
        jsonschema.validate(json.loads(completion.text), PERSON)
    assert len({c.text for c in completions}) > 1, "the seeds changed nothing"


@padded_only
def test_a_grammar_cut_by_max_tokens_ends_with_length(engine: Engine) -> None:
    cut = replace(GREEDY, max_new_tokens=5, grammar=held_to(PERSON))
    completion = engine.generate([engine.request(chat(engine, ASK), cut)])[0]
    assert completion.finish_reason == "length"
    assert completion.completion_tokens == 5
    assert completion.text.startswith('{"name": "')


@padded_only
@pytest.mark.parametrize(
    ("schema", "reason"),
    [
        ({"type": "nonsense"}, "nonsense"),
        ({"$ref": "#/$defs/missing"}, "missing"),
        ({"type": "string", "pattern": "(unclosed"}, ""),
    ],
)
def test_a_schema_that_does_not_compile_names_the_field(
    engine: Engine, schema: dict, reason: str
) -> None:
    with pytest.raises(GrammarError, match=f"^response_format: .*{reason}") as caught:
        engine.request("Hi", replace(GREEDY, grammar=held_to(schema)))
    assert caught.value.field == "response_format"


WEATHER = Function(
    "get_weather",
    "The weather now in a city",
    json.dumps(
        {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        }
    ),
)
ADD = Function(
    "add",
    "Add two numbers",
    json.dumps(
        {
            "type": "object",
            "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
            "required": ["a", "b"],
            "additionalProperties": False,
        }
    ),
)


def calls_held_to(choice: str, parallel: bool) -> Grammar:
    functions = [{"name": f.name, "parameters": json.loads(f.parameters)} for f in (WEATHER, ADD)]
    spec = {"functions": functions, "choice": choice, "parallel": parallel}
    return Grammar(json.dumps(spec), kind="tool_calls", field="tools")


@padded_only
@pytest.mark.parametrize(
    ("choice", "names"), [("required", {"get_weather", "add"}), ("add", {"add"})]
)
def test_a_required_or_named_call_parses_against_its_functions_parameters(
    engine: Engine, choice: str, names: set[str]
) -> None:
    """Greedy and sampled, the one call allowed is whole, of the function
    asked for (any, for ``required``), its arguments valid."""
    prompt = engine.render_conversation(
        (Message("user", "What is the weather in Paris?"),), (WEATHER, ADD)
    )
    held = replace(GREEDY, grammar=calls_held_to(choice, parallel=False))
    requests = [engine.request(prompt, replace(held, temperature=t, seed=1)) for t in (0.0, 1.0)]
    for completion in engine.generate(requests):
        assert completion.finish_reason == "stop"
        content, calls = split_tool_calls(completion.text)
        assert content is None and len(calls) == 1
        assert calls[0].name in names
        function = {f.name: f for f in (WEATHER, ADD)}[calls[0].name]
        jsonschema.validate(json.loads(calls[0].arguments), json.loads(function.parameters))


@padded_only
def test_a_tool_that_does_not_compile_names_tools(engine: Engine) -> None:
    broken = Function("broken", "", json.dumps({"type": "nonsense"}))
    spec = {"functions": [{"name": "broken", "parameters": {"type": "nonsense"}}]}
    grammar = Grammar(
        json.dumps(spec | {"choice": "auto", "parallel": True}), "tool_calls", "tools"
    )
    with pytest.raises(GrammarError, match=r"^tools: ") as caught:
        engine.request(
            engine.render_conversation((Message("user", "Hi"),), (broken,)),
            replace(GREEDY, grammar=grammar),
        )
    assert caught.value.field == "tools"


@padded_only
def test_a_model_without_an_end_token_refuses_a_grammar_naming_its_field(engine: Engine) -> None:
    """A reply held to a grammar must end where the grammar does, with an end
    token: a model that declares none cannot give one."""
    grammars = Grammars(engine.tokenizer, engine.model.config.vocab_size, eos_token_ids=())
    with pytest.raises(GrammarError, match="no end-of-sequence token") as refused:
        grammars.compile(held_to(PERSON))
    assert refused.value.field == "response_format"


@padded_only
def test_a_grammar_asked_for_again_is_compiled_once_and_each_sequence_gets_its_own(
    engine: Engine,
) -> None:
    """A request's ``n`` choices, and a chat's every turn with the same tools,
    send the same grammar: compiling it is the costly part, so it is done
    once; each sequence still advances a matcher of its own."""
    grammars = Grammars(
        engine.tokenizer, engine.model.config.vocab_size, sorted(engine.eos_token_ids)
    )
    first, again = grammars.compile(held_to(PERSON)), grammars.compile(held_to(PERSON))
    assert again is first
    assert grammars.compile(held_to({"type": "object"})) is not first
    one, two = first.constraint(), first.constraint()
    assert one is not two and one._matcher is not two._matcher
    held, beside = engine.generate(
        [engine.request(chat(engine, ASK), replace(GREEDY, grammar=held_to(PERSON)))] * 2
    )
    assert held.text == beside.text and json.loads(held.text)
