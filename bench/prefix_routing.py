"""Prefix routing against Serve's default router: chats held at once on two
CPU model replicas that each keep a prefix cache.

    python -m bench.prefix_routing        (--help for the knobs)

Each pass starts ``make serve``'s app afresh (``bench/servers.py``) with two
model replicas from the start and ``PREFIX_ROUTING`` on or off, the two
taking turns (on, off, off, on, ...), and warms both replicas up. Then
``--chats`` conversations run at once, each ``--turns`` turns: a turn sends
the whole conversation so far with a new question (its own system prompt
first, a few hundred tokens), streamed, greedy, and waits for the reply
before the next. For the turns after the first it reports the time to first
token, how many found the whole of the turn before in their replica's cache,
and the share of prompt tokens found there
(``usage.prompt_tokens_details.cached_tokens``; a turn that misses the turn
before may still find older ones), and appends the table to
``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import openai

from bench.local_cluster import pinned_config
from bench.results_file import provenance, record_section
from bench.servers import Server, servers, taking_turns, warm_up
from bench.ttft import percentile

SYSTEM = (
    "You are the support assistant of conversation {chat}. Answer questions about Ray Serve "
    "deployments, replicas, autoscaling, batching and the HTTP proxy in one or two plain "
    "sentences, without lists, code or headings. "
)
QUESTIONS = [
    "What is a replica?",
    "How does a deployment scale to zero?",
    "Why batch requests on one replica?",
    "What does the HTTP proxy do?",
    "What happens to a request while a replica starts?",
    "How is a replica's health checked?",
    "What does max_ongoing_requests limit?",
    "Why keep a spare process?",
]


@dataclasses.dataclass(frozen=True)
class Turn:
    first_token_s: float
    prompt_tokens: int
    cached_tokens: int
    found_last: bool = False
    """The replica's cache held the whole of the turn before's prompt."""


def one_turn(
    client: openai.OpenAI, model: str, messages: list[dict], max_tokens: int
) -> tuple[Turn, str]:
    """Stream one reply to its end; the turn's figures and the reply's text."""
    started = time.perf_counter()
    first, text, usage = None, [], None
    for chunk in client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            first = first if first is not None else time.perf_counter() - started
            text.append(chunk.choices[0].delta.content)
        usage = chunk.usage or usage
    assert usage is not None and first is not None, "a stream without usage or text"
    cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
    return Turn(first, usage.prompt_tokens, cached), "".join(text)


def conversation(server: Server, chat: int, turns: int, max_tokens: int) -> list[Turn]:
    """One chat, turn after turn; every turn's figures."""
    messages = [{"role": "system", "content": SYSTEM.format(chat=chat) * 8}]
    done = []
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=600) as client:
        for turn in range(turns):
            messages.append({"role": "user", "content": QUESTIONS[(chat + turn) % len(QUESTIONS)]})
            figures, reply = one_turn(client, server.model, messages, max_tokens)
            messages.append({"role": "assistant", "content": reply})
            last = done[-1].prompt_tokens if done else None
            done.append(
                dataclasses.replace(
                    figures, found_last=last is not None and figures.cached_tokens >= last
                )
            )
    return done


@dataclasses.dataclass(frozen=True)
class Pass:
    routing: str
    later_turns: list[Turn]
    seconds: float

    def row(self) -> str:
        firsts = sorted(t.first_token_s for t in self.later_turns)
        cached = sum(t.cached_tokens for t in self.later_turns)
        prompt = sum(t.prompt_tokens for t in self.later_turns)
        found = sum(t.found_last for t in self.later_turns)
        return (
            f"| {self.routing:<3} | {statistics.median(firsts):>6.2f} | "
            f"{percentile(firsts, 0.9):>6.2f} | {max(firsts):>6.2f} | "
            f"{found}/{len(self.later_turns)} | {cached / prompt:>6.1%} | {self.seconds:>6.1f} |"
        )


HEADER = (
    "| PREFIX_ROUTING | later turns' first token: median s | p90 s | max s | "
    "turns finding the turn before | prompt tokens cached | all chats, s |\n"
    "|---|---|---|---|---|---|---|"
)


def run_pass(server: Server, routing: str, args: argparse.Namespace) -> Pass:
    with server.started():
        warm_up(server, 4)
        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=args.chats) as pool:
            chats = list(
                pool.map(
                    lambda chat: conversation(server, chat, args.turns, args.max_tokens),
                    range(args.chats),
                )
            )
        seconds = time.perf_counter() - started
    return Pass(routing, [turn for chat in chats for turn in chat[1:]], seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chats", type=int, default=8, help="conversations held at once")
    parser.add_argument("--turns", type=int, default=6, help="turns per conversation")
    parser.add_argument("--max-tokens", type=int, default=24, help="most tokens a reply")
    parser.add_argument("--rounds", type=int, default=2, help="passes per setting")
    args = parser.parse_args()
    app = servers(pinned_config())["app"]
    setting = {
        value: dataclasses.replace(
            app,
            name=f"{app.name}, PREFIX_ROUTING={value}",
            env={**app.env, "PREFIX_ROUTING": value, "MIN_REPLICAS": "2", "MAX_REPLICAS": "2"},
        )
        for value in ("on", "off")
    }
    print(HEADER, flush=True)
    passes = []
    for routing in taking_turns("on", "off", args.rounds):
        passes.append(run_pass(setting[routing], routing, args))
        print(passes[-1].row(), flush=True)
    record_section(
        "Prefix routing on two CPU replicas",
        [
            f"{provenance()}. {args.chats} chats at once, {args.turns} turns each, greedy "
            f"replies of at most {args.max_tokens} tokens; two model replicas of one CPU, "
            "each keeping a prefix cache; the settings take turns, each pass a fresh app.\n",
            HEADER,
            *(p.row() for p in passes),
        ],
    )


if __name__ == "__main__":
    main()
