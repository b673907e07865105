"""Lending a CPU replica's matrix products the CPUs nobody else is using.

Why: a replica reserves ``NUM_CPUS_PER_REPLICA`` CPUs (one, by default), and
at one user one replica decodes while the machine's other CPUs sit idle. The
GGUF kernels split a product's output columns between threads, and each
column is computed the same way whatever the split, so more threads change
the time a token takes, never its logits (decision record 0029). Torch's own
small ops stay on the reserved threads: split across threads, they got slower
(decision record 0027).

"Nobody else" is measured, not assumed: the busy time of every CPU
(``/proc/stat``) less this process's own, over the last quarter second. A
second replica that starts decoding takes the lent CPU back within that time.
The lending never goes past the CPUs this process may run on (its affinity)
nor a container's CPU quota (cgroup v2 ``cpu.max``), so a Kubernetes limit is
kept. Where ``/proc/stat`` cannot be read, nothing is lent.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path

SAMPLE_EVERY_S = 0.25
"""How often the decode loop looks again; also how long it may keep a CPU
another process has started to use."""
FREE_ENOUGH = 0.7
"""A CPU is lent when other processes leave at least this share of it free:
Ray's own processes use a little of every idle machine."""
TICKS_PER_S = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


class IdleCpus:
    """How many threads a replica's products may use now: its reserved ones,
    plus the CPUs other processes have left idle."""

    def __init__(
        self,
        reserved: int,
        stat: Path = Path("/proc/stat"),
        quota: Path = Path("/sys/fs/cgroup/cpu.max"),
        cpus: int | None = None,
        own_cpu_s: Callable[[], float] = time.process_time,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``cpus``: those this process may run on (by default its affinity)."""
        self.reserved = reserved
        self._stat, self._own_cpu_s, self._clock = stat, own_cpu_s, clock
        self._usable = min(cpus or _affinity(), _quota_cpus(quota))
        self._threads = reserved
        self._last = self._sample()

    def threads(self) -> int:
        """The reserved threads, or more where CPUs were idle over the last
        :data:`SAMPLE_EVERY_S`; cheap enough to ask at every decode step."""
        now = self._clock()
        if self._last is None or now - self._last[0] < SAMPLE_EVERY_S:
            return self._threads
        sample = self._sample()
        if sample is None:
            return self.reserved
        (then, busy_then, own_then), (_, busy, own) = self._last, sample
        others = max(0.0, (busy - busy_then) - (own - own_then)) / (now - then)
        idle = self._usable - self.reserved - others
        self._threads = self.reserved + max(0, math.floor(idle + 1 - FREE_ENOUGH))
        self._last = sample
        return self._threads

    def _sample(self) -> tuple[float, float, float] | None:
        """(when, CPU-seconds every CPU has been busy, this process's own)."""
        try:
            line = self._stat.read_text().split("\n", 1)[0]
        except OSError:
            return None
        fields = [int(value) for value in line.split()[1:]]
        if len(fields) < 5:
            return None
        idle = fields[3] + fields[4]  # idle and iowait
        return self._clock(), (sum(fields[:8]) - idle) / TICKS_PER_S, self._own_cpu_s()


def _affinity() -> int:
    """The CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _quota_cpus(quota: Path) -> float:
    """A container's CPU limit (``quota period`` in cgroup v2's ``cpu.max``),
    or infinity where there is none."""
    try:
        limit, period = quota.read_text().split()[:2]
    except (OSError, ValueError):
        return math.inf
    return math.inf if limit == "max" else int(limit) / int(period)
