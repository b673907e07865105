"""bench/RESULTS.md keeps each benchmark's latest figures (bench/results_file.py)."""

from datetime import date
from pathlib import Path

import pytest

from bench import results_file


class RunDay(date):
    """The day a run is dated, fixed: a run across midnight would otherwise
    date its section a day after the test's expectation."""

    @classmethod
    def today(cls) -> date:
        return cls(2026, 11, 29)


TODAY = RunDay.today().isoformat()


@pytest.fixture
def results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "RESULTS.md"
    path.write_text(
        "# Benchmark results\n\nIntro.\n\n"
        "## Full comparison, 2026-11-01\n\nold table\n\n"
        "## Head to head, 2026-11-02\n\nold ratio\n\n"
        "## A note by hand, 2026-11-03\n\nkept\n"
    )
    monkeypatch.setattr(results_file, "RESULTS", path)
    monkeypatch.setattr(results_file, "date", RunDay)
    return path


def test_a_run_replaces_its_own_section_and_keeps_the_others(results: Path) -> None:
    results_file.record_section("Head to head", ["new ratio"])
    text = results.read_text()
    assert "old ratio" not in text and "old table" in text and "kept" in text
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    assert headings == [
        "## Full comparison, 2026-11-01",
        f"## Head to head, {TODAY}",
        "## A note by hand, 2026-11-03",
    ]


def test_a_benchmark_run_for_the_first_time_goes_at_the_end(results: Path) -> None:
    results_file.record_section("Cold start", ["figures"])
    text = results.read_text()
    assert text.endswith(f"## Cold start, {TODAY}\n\nfigures\n")
    assert "old table" in text and "old ratio" in text
