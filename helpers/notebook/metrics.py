"""Read the kit's metrics the way Prometheus does: from the node's export port.

Ray exports every process's metrics on the head node's metrics-export port,
which the kit fixes (``cluster.METRICS_EXPORT_PORT``), in Prometheus's text
format. A scrape here is a plain HTTP GET, parsed with ``prometheus_client``
(Ray's own dependency), and summed over the labels a question leaves open:
``total(scrape(), "ray_llm_requests_total", endpoint="/generate")`` adds up
every replica and outcome of that endpoint.

Ray's processes report to the exporter every few seconds, so a count read
right after a request may not hold it yet: :func:`wait_for_total` waits
until it does.
"""

from __future__ import annotations

import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from helpers.notebook.client import LLMClient, Reply
from helpers.notebook.cluster import METRICS_URL

Labels = frozenset[tuple[str, str]]


@dataclass(frozen=True)
class Scrape:
    """One scrape: every sample by name and labels, and when it was taken."""

    samples: dict[tuple[str, Labels], float]
    taken_at: float

    def total(self, name: str, **labels: str) -> float:
        """The sum of ``name``'s samples whose labels include ``labels``."""
        wanted = set(labels.items())
        return sum(
            value
            for (sample, sample_labels), value in self.samples.items()
            if sample == name and wanted <= sample_labels
        )

    def names(self, prefix: str = "") -> set[str]:
        return {name for name, _ in self.samples if name.startswith(prefix)}


def scrape(url: str = METRICS_URL, timeout_s: float = 10) -> Scrape:
    """Every sample the export port shows now."""
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        text = response.read().decode()
    samples: dict[tuple[str, Labels], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            samples[key] = samples.get(key, 0.0) + sample.value
    return Scrape(samples, time.monotonic())


def wait_for_total(
    name: str, at_least: float, timeout_s: float = 60, url: str = METRICS_URL, **labels: str
) -> Scrape:
    """Scrape until ``name`` (summed over ``labels``) reaches ``at_least``;
    the last scrape. Raises TimeoutError naming what it saw."""
    deadline = time.monotonic() + timeout_s
    while True:
        now = scrape(url)
        seen = now.total(name, **labels)
        if seen >= at_least:
            return now
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name}{labels or ''} stayed at {seen}, not {at_least}")
        time.sleep(1)


@dataclass
class BurstWatch:
    """Scrapes taken while a burst of requests ran, and what the burst sent."""

    scrapes: list[Scrape]
    replies: list[Reply]

    def grew(self, name: str, **labels: str) -> float:
        """How much ``name`` grew from the first scrape to the last."""
        return self.scrapes[-1].total(name, **labels) - self.scrapes[0].total(name, **labels)

    def series(self) -> dict[str, list[float]]:
        """Per scrape interval: seconds since the start, mean first-token
        latency, output tokens per second, and batch rows at the end."""
        start = self.scrapes[0].taken_at
        out: dict[str, list[float]] = {"seconds": [], "first_token_s": [], "tokens_per_s": []}
        out["batch_rows"] = []
        for before, after in zip(self.scrapes, self.scrapes[1:], strict=False):
            span = after.taken_at - before.taken_at
            firsts = _grew(before, after, "ray_llm_time_to_first_token_seconds_count")
            waited = _grew(before, after, "ray_llm_time_to_first_token_seconds_sum")
            out["seconds"].append(after.taken_at - start)
            out["first_token_s"].append(waited / firsts if firsts else float("nan"))
            out["tokens_per_s"].append(_grew(before, after, TOKENS) / span)
            out["batch_rows"].append(after.total("ray_llm_batch_rows"))
        return out


TOKENS = "ray_llm_completion_tokens_total"
DONE = "ray_llm_requests_total"


def _grew(before: Scrape, after: Scrape, name: str) -> float:
    return after.total(name) - before.total(name)


def watch_burst(
    client: LLMClient,
    requests: int = 16,
    concurrency: int = 8,
    max_tokens: int = 32,
    interval_s: float = 1.0,
) -> BurstWatch:
    """Send ``requests`` streamed chats, ``concurrency`` at a time, scraping
    every ``interval_s`` until the burst ended and its last completion
    reached the export port."""
    first = scrape()
    scrapes = [first]
    messages = [{"role": "user", "content": "Tell me a short story about a lighthouse."}]
    with ThreadPoolExecutor(concurrency) as pool:
        sent = [
            pool.submit(client.stream_chat, messages, lambda _: None, max_tokens, 0.0)
            for _ in range(requests)
        ]
        while not all(future.done() for future in sent):
            time.sleep(interval_s)
            scrapes.append(scrape())
    replies = [future.result() for future in sent]
    counted = first.total(DONE, outcome="completed") + requests
    while scrapes[-1].total(DONE, outcome="completed") < counted:
        time.sleep(interval_s)
        scrapes.append(scrape())
        if scrapes[-1].taken_at - first.taken_at > 120:
            raise TimeoutError("the burst's requests never all reached the metrics")
    return BurstWatch(scrapes, replies)


def plot_burst(watch: BurstWatch) -> Any:
    """First-token latency, output tokens/s and batch rows over the burst."""
    import matplotlib.pyplot as plt

    series = watch.series()
    figure, axes = plt.subplots(1, 3, figsize=(12, 3))
    panels = [
        ("first_token_s", "first token, mean s"),
        ("tokens_per_s", "output tokens/s"),
        ("batch_rows", "batch rows"),
    ]
    for ax, (key, label) in zip(axes, panels, strict=True):
        ax.plot(series["seconds"], series[key], marker="o")
        ax.set_title(label)
        ax.set_xlabel("seconds")
    figure.tight_layout()
    return figure
