"""Dirty-page tracking: KVM's dirty ring vs its dirty bitmap (run by
benchmarks/run.py, or alone):

    python benchmarks/dirty_log.py [--rounds N]

Two VMs of the same shape in one process, one per way of logging the
guest's writes (``pyvt.Vm(dirty_ring="64K")`` and the default bitmap), in
turn round by round.  For N pages the guest dirties (a long-mode loop
writing one qword per page):

- restore(): putting the VM back to a snapshot taken before the writes;
- dirty_pages(): harvesting which pages were written (ring: read the
  entries, KVM_RESET_DIRTY_RINGS; bitmap: KVM_GET_DIRTY_LOG per slot);
- the guest's run itself (both write-protect the pages they log).

Medians; the ratio is ring / bitmap (below 1: the ring is faster).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import pyvt
from pyvt import exits

HERE = Path(__file__).resolve().parent
CODE, TABLE, FIRST = 0x1000, 0x10000, 0x400000
RING = "64K"  # 4096 entries: every N below fits, so no ring-full exit is timed

# Writes rbx to each address of the zero-terminated table at rsi, then stops.
WRITER = pyvt.assemble_file(str(HERE.parent / "tests" / "guests" / "write_table.S"))


class Subject:
    """A VM whose guest dirties ``pages`` pages per run, and a snapshot of
    it from before."""

    def __init__(self, memory: str, ring, pages: int):
        self.vm = pyvt.Vm(memory, dirty_ring=ring)
        self.vm.memory.write(CODE, WRITER)
        addresses = [FIRST + n * 4096 for n in range(pages)]
        self.vm.memory.write(TABLE, b"".join(a.to_bytes(8, "little") for a in addresses)
                             + bytes(8))
        self.cpu = self.vm.vcpu(0, mode="long")
        self.dirty(0)  # page tables' accessed/dirty bits set: the rounds are alike
        self.snap = self.vm.snapshot()

    def dirty(self, value: int) -> float:
        cpu = self.cpu
        cpu.regs.rip, cpu.regs.rsi, cpu.regs.rbx = CODE, TABLE, value
        start = time.perf_counter()
        assert isinstance(cpu.run(timeout=60), exits.Hlt)
        return time.perf_counter() - start

    def round(self, value: int) -> tuple:
        """(guest run, restore, harvest) seconds."""
        run = self.dirty(value)
        start = time.perf_counter()
        self.vm.restore(self.snap)
        restore = time.perf_counter() - start
        self.dirty(value)
        start = time.perf_counter()
        self.vm.memory.dirty_pages()
        harvest = time.perf_counter() - start
        self.vm.restore(self.snap)
        return run, restore, harvest

    def close(self) -> None:
        self.vm.close()
        self.snap.close()


def measure(memory: str, pages: int, rounds: int) -> dict:
    subjects = {"ring": Subject(memory, RING, pages), "bitmap": Subject(memory, False, pages)}
    times = {name: [] for name in subjects}
    try:
        for n in range(rounds):
            for name, subject in subjects.items():
                times[name].append(subject.round(n + 1))
    finally:
        for subject in subjects.values():
            subject.close()
    return {name: [statistics.median(t[i] for t in samples) for i in range(3)]
            for name, samples in times.items()}


def report(rounds: int = 15, cases=(("64M", 16), ("64M", 256), ("64M", 2048),
                                    ("1G", 16), ("1G", 2048))) -> None:
    print(f"\ndirty ring ({RING}) vs dirty bitmap, {rounds} rounds, medians; ratio ring/bitmap")
    print(f"{'':<44} {'ring':>9} {'bitmap':>9}")
    for memory, pages in cases:
        m = measure(memory, pages, rounds)
        for i, what in ((1, "restore()"), (2, "dirty_pages()"), (0, "guest run")):
            ring, bitmap = m["ring"][i], m["bitmap"][i]
            print(f"{f'{memory} VM, {pages} pages dirtied: {what}':<44} {ring * 1e3:9.3f} "
                  f"{bitmap * 1e3:9.3f} ms {ring / bitmap:6.2f}x")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    report(args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
