"""How many threads a replica's products borrow: the CPUs other processes
leave idle, measured from a /proc/stat written by the test, within the
process's CPUs and its container's quota."""

from pathlib import Path

import pytest

from helpers.engine import idle_cpus
from helpers.engine.idle_cpus import IdleCpus

TICKS = idle_cpus.TICKS_PER_S


class Machine:
    """A /proc/stat and a process's CPU time that a test moves forward."""

    def __init__(self, tmp_path: Path) -> None:
        self.stat = tmp_path / "stat"
        self.now = 100.0
        self.busy_s = 0.0  # every CPU's busy time, this process's included
        self.own_s = 0.0
        self.write()

    def write(self) -> None:
        busy = round(self.busy_s * TICKS)
        # user nice system idle iowait irq softirq steal
        self.stat.write_text(f"cpu  {busy} 0 0 123456 7 0 0 0 0 0\ncpu0 0 0 0 0 0\n")

    def run(self, seconds: float, own_cpus: float, other_cpus: float) -> None:
        self.now += seconds
        self.own_s += own_cpus * seconds
        self.busy_s += (own_cpus + other_cpus) * seconds
        self.write()

    def idle_cpus(self, reserved: int, cpus: int, quota: Path | None = None) -> IdleCpus:
        return IdleCpus(
            reserved,
            stat=self.stat,
            quota=quota or self.stat.with_name("no-quota"),
            cpus=cpus,
            own_cpu_s=lambda: self.own_s,
            clock=lambda: self.now,
        )


@pytest.fixture
def machine(tmp_path: Path) -> Machine:
    return Machine(tmp_path)


def test_a_replica_decoding_alone_borrows_every_idle_cpu(machine: Machine) -> None:
    lender = machine.idle_cpus(reserved=1, cpus=4)
    machine.run(0.5, own_cpus=1.0, other_cpus=0.2)  # Ray's own processes, a little
    assert lender.threads() == 4


def test_a_cpu_another_process_uses_is_not_borrowed(machine: Machine) -> None:
    lender = machine.idle_cpus(reserved=1, cpus=2)
    machine.run(0.5, own_cpus=1.0, other_cpus=0.9)  # a second replica decoding
    assert lender.threads() == 1
    machine.run(0.5, own_cpus=2.0, other_cpus=0.1)  # it stopped; our own threads are ours
    assert lender.threads() == 2


def test_the_count_holds_between_samples(machine: Machine) -> None:
    lender = machine.idle_cpus(reserved=1, cpus=2)
    machine.run(0.5, own_cpus=1.0, other_cpus=0.0)
    assert lender.threads() == 2
    machine.run(idle_cpus.SAMPLE_EVERY_S / 2, own_cpus=1.0, other_cpus=1.0)
    assert lender.threads() == 2
    machine.run(idle_cpus.SAMPLE_EVERY_S, own_cpus=1.0, other_cpus=1.0)
    assert lender.threads() == 1


def test_a_containers_quota_is_kept(machine: Machine, tmp_path: Path) -> None:
    quota = tmp_path / "cpu.max"
    quota.write_text("150000 100000\n")  # 1.5 CPUs
    lender = machine.idle_cpus(reserved=1, cpus=8, quota=quota)
    machine.run(0.5, own_cpus=1.0, other_cpus=0.0)
    assert lender.threads() == 1
    quota.write_text("max 100000\n")
    unlimited = machine.idle_cpus(reserved=1, cpus=8, quota=quota)
    machine.run(0.5, own_cpus=1.0, other_cpus=0.0)
    assert unlimited.threads() == 8


def test_without_proc_stat_nothing_is_lent(tmp_path: Path) -> None:
    lender = IdleCpus(2, stat=tmp_path / "missing", cpus=8)
    assert lender.threads() == 2
