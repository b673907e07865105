"""Reading the kit's metrics as notebook 06 plots them (helpers/notebook/metrics.py)."""

from __future__ import annotations

import math

import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers.notebook.metrics import FIRST_TOKEN, Scrape, median_grown

BOUNDS = ["0.5", "1.0", "2.5", "+Inf"]


def scraped(buckets: list[int], taken_at: float = 0.0) -> Scrape:
    """A scrape of the first-token histogram on two replicas, as Ray's export
    port shows it, holding ``buckets`` observations per bucket (not
    cumulative) split between them; ``_sum`` as Ray writes it, each at its
    bucket's midpoint."""
    midpoints = [0.25, 0.75, 1.75, 5.0]
    lines = [f"# TYPE {FIRST_TOKEN} histogram"]
    for replica in ("a", "b"):
        share = [count // 2 + (count % 2 if replica == "a" else 0) for count in buckets]
        cumulative = 0
        for bound, count in zip(BOUNDS, share, strict=True):
            cumulative += count
            lines.append(f'{FIRST_TOKEN}_bucket{{le="{bound}",replica="{replica}"}} {cumulative}')
        lines.append(f'{FIRST_TOKEN}_count{{replica="{replica}"}} {cumulative}')
        total = sum(m * c for m, c in zip(midpoints, share, strict=True))
        lines.append(f'{FIRST_TOKEN}_sum{{replica="{replica}"}} {total}')
    samples = {}
    for family in text_string_to_metric_families("\n".join(lines) + "\n"):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return Scrape(samples, taken_at)


def test_the_median_of_what_a_burst_observed_comes_from_the_buckets() -> None:
    """Six first tokens in (0.5, 1] and four in (1, 2.5] since the last
    scrape: the median is in the first of the two, not the midpoints' mean
    (1.15 s) Ray's ``_sum`` would give."""
    before = scraped([3, 1, 0, 0])
    after = scraped([3, 7, 4, 0], taken_at=1.0)
    assert median_grown(before, after, FIRST_TOKEN) == pytest.approx(0.5 + 0.5 * 5 / 6)


def test_past_the_last_bound_and_with_nothing_observed() -> None:
    before = scraped([0, 0, 0, 0])
    assert median_grown(before, scraped([0, 0, 1, 3]), FIRST_TOKEN) == 2.5
    assert math.isnan(median_grown(before, before, FIRST_TOKEN))
