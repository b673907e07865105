"""Read the kit's metrics the way Prometheus does: from the node's export port.

Ray exports every process's metrics on the head node's metrics-export port,
which the kit fixes where it is free (``cluster.metrics_export_port``), in Prometheus's text
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
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from helpers.notebook.client import LLMClient, Reply
from helpers.notebook.cluster import metrics_url
from helpers.ray_env import RAY_ENV

Labels = frozenset[tuple[str, str]]
BURST_TIMEOUT_S = 300
REPORT_INTERVAL_S = int(RAY_ENV["RAY_metrics_report_interval_ms"]) / 1000
"""How often Ray's processes report their metrics to the export port."""


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


def scrape(url: str | None = None, timeout_s: float = 10) -> Scrape:
    """Every sample the export port (``url``, by default the local node's) shows now."""
    with urllib.request.urlopen(url or metrics_url(), timeout=timeout_s) as response:
        text = response.read().decode()
    samples: dict[tuple[str, Labels], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            samples[key] = samples.get(key, 0.0) + sample.value
    return Scrape(samples, time.monotonic())


def settled_scrape(url: str | None = None, timeout_s: float = 30) -> Scrape:
    """A scrape once the kit's counts stopped moving: two scrapes a report
    interval apart agree. A baseline taken before that may still miss a
    request that was answered but not yet reported, and count it later."""
    last = scrape(url)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        time.sleep(REPORT_INTERVAL_S + 0.5)
        now = scrape(url)
        if _counts(now) == _counts(last):
            return now
        last = now
    raise TimeoutError(f"the kit's metrics kept moving for {timeout_s:.0f} s")


def _counts(scraped: Scrape) -> dict[tuple[str, Labels], float]:
    return {
        key: value
        for key, value in scraped.samples.items()
        if key[0].startswith("ray_llm_") and key[0].endswith(("_total", "_count"))
    }


def wait_for_total(
    name: str, at_least: float, timeout_s: float = 60, url: str | None = None, **labels: str
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


TOKENS = "ray_llm_completion_tokens_total"
REQUESTS = "ray_llm_requests_total"
FIRST_TOKEN = "ray_llm_time_to_first_token_seconds"
PANELS = {
    "first_token_s": "first token, median s",
    "tokens_per_s": "output tokens/s",
    "batch_rows": "batch rows",
}


@dataclass
class BurstWatch:
    """Scrapes taken while a burst of requests ran, and what the burst sent."""

    scrapes: list[Scrape]
    replies: list[Reply]

    def grew(self, name: str, **labels: str) -> float:
        """How much ``name`` grew from the first scrape to the last."""
        return self.scrapes[-1].total(name, **labels) - self.scrapes[0].total(name, **labels)

    def series(self) -> dict[str, list[float]]:
        """Per scrape after the first: seconds since the first, and each of
        :data:`PANELS` over the interval before it (batch rows: at its end)."""
        out: dict[str, list[float]] = {key: [] for key in ("seconds", *PANELS)}
        for before, after in zip(self.scrapes, self.scrapes[1:], strict=False):
            out["seconds"].append(after.taken_at - self.scrapes[0].taken_at)
            out["first_token_s"].append(median_grown(before, after, FIRST_TOKEN))
            out["tokens_per_s"].append(
                _grew(before, after, TOKENS) / (after.taken_at - before.taken_at)
            )
            out["batch_rows"].append(after.total("ray_llm_batch_rows"))
        return out


def _grew(before: Scrape, after: Scrape, name: str, **labels: str) -> float:
    return after.total(name, **labels) - before.total(name, **labels)


def median_grown(before: Scrape, after: Scrape, histogram: str) -> float:
    """The median of what ``histogram`` observed between two scrapes, from
    its buckets, as Prometheus's ``histogram_quantile`` reads them: within
    the bucket that holds it, in proportion. Not its ``_sum``: Ray rebuilds
    a histogram from its buckets and sums each observation as its bucket's
    midpoint. NaN when nothing was observed."""
    bounds = sorted(
        {dict(labels)["le"] for name, labels in after.samples if name == f"{histogram}_bucket"},
        key=float,
    )
    counts = [_grew(before, after, f"{histogram}_bucket", le=bound) for bound in bounds]
    if not counts or counts[-1] <= 0:
        return float("nan")
    half, lower, below = counts[-1] / 2, 0.0, 0.0
    for bound, count in zip(map(float, bounds), counts, strict=True):
        if count >= half:
            if bound == float("inf"):
                return lower  # past the last bound: as far as the buckets tell
            return lower + (bound - lower) * (half - below) / (count - below)
        lower, below = bound, count
    return float("nan")


class BurstPlot:
    """:data:`PANELS` side by side, redrawn in place after every scrape."""

    def __init__(self) -> None:
        import matplotlib.pyplot as plt
        from IPython.display import display

        self.figure, axes = plt.subplots(1, len(PANELS), figsize=(12, 3))
        self.lines = {}
        for ax, (key, title) in zip(axes, PANELS.items(), strict=True):
            ax.set_title(title)
            ax.set_xlabel("seconds")
            (self.lines[key],) = ax.plot([], [], marker="o")
        self.figure.tight_layout()
        plt.close(self.figure)  # shown through the display handle only
        self.handle = display(self.figure, display_id=True)

    def update(self, watch: BurstWatch) -> None:
        series = watch.series()
        for key, line in self.lines.items():
            line.set_data(series["seconds"], series[key])
            line.axes.relim()
            line.axes.autoscale_view()
        if self.handle is not None:
            self.handle.update(self.figure)


@contextmanager
def _senders(workers: int) -> Iterator[ThreadPoolExecutor]:
    """A thread pool whose block waits for every request sent, except when the
    notebook is interrupted: a user who stops a cell wants it back now, as from
    a :class:`~helpers.notebook.burst.Burst`. Then what was not yet sent is
    dropped, and each request on its way ends on its own."""
    pool = ThreadPoolExecutor(workers)
    interrupted = False
    try:
        yield pool
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        pool.shutdown(wait=not interrupted, cancel_futures=interrupted)


def watch_burst(
    client: LLMClient,
    requests: int = 16,
    concurrency: int = 8,
    max_tokens: int = 32,
    interval_s: float = 1.0,
    on_scrape: Callable[[BurstWatch], None] | None = None,
) -> BurstWatch:
    """Send ``requests`` streamed chats, ``concurrency`` at a time, scraping
    every ``interval_s`` (and calling ``on_scrape``) until the burst ended and
    every replica reported its part. An interrupt ends it at once."""
    messages = [{"role": "user", "content": "Tell me a short story about a lighthouse."}]
    watch = BurstWatch([settled_scrape()], [])
    counted = watch.scrapes[0].total(REQUESTS, outcome="completed") + requests
    with _senders(concurrency) as pool:
        sent = [
            pool.submit(client.stream_chat, messages, lambda _: None, max_tokens, 0.0)
            for _ in range(requests)
        ]
        while watch.scrapes[-1].total(REQUESTS, outcome="completed") < counted:
            if any(future.done() and future.exception() for future in sent):
                break  # its error is raised below
            if time.monotonic() - watch.scrapes[0].taken_at > BURST_TIMEOUT_S:
                raise TimeoutError(f"the burst's requests never all reached {metrics_url()}")
            time.sleep(interval_s)
            watch.scrapes.append(scrape())
            if on_scrape:
                on_scrape(watch)
    watch.replies = [future.result() for future in sent]
    # The ingress's count arrived; each model replica reports its own tokens
    # on its own schedule, so the last scrape waits until they all have.
    watch.scrapes.append(settled_scrape())
    return watch
