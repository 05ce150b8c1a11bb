"""Snapshot benchmarks (run by benchmarks/run.py, or alone):

    python benchmarks/snapshots.py [--rounds N]

- restore() of a 64 MiB VM whose guest dirtied 64 pages, vs a fresh VM of
  the same shape run to the same point;
- restore() when nothing was dirtied (the guest has not run since the
  last restore): restore's fixed cost, against a fresh VM too;
- Vm.from_snapshot() to a vCPU ready to run, vs a fresh VM made ready;
  the same from clones made ahead (``snap.prepare_clones(n)``: the time
  from_snapshot takes to hand one out, the preparing not counted);
- calls per second of a guest function reset to a snapshot between calls,
  vs a fresh VM per call;
- snapshot() of an untouched 1 GiB VM: its time and the memory the snapshot
  holds (it follows the pages in use, not the RAM size).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import pyvt
from pyvt import exits

HERE = Path(__file__).resolve().parent
MEMORY = "64M"
DIRTY_PAGES = 64


def _fresh(code: bytes, rcx: int = 0):
    vm = pyvt.Vm(MEMORY)
    vm.memory.write(0x1000, code)
    cpu = vm.vcpu(0, mode="long")
    cpu.regs.rip = 0x1000
    cpu.regs.rcx = rcx
    return vm, cpu


def _fresh_to_the_same_point(code: bytes, samples: int) -> float:
    times = []
    for _ in range(samples):
        start = time.perf_counter()
        vm, cpu = _fresh(code, DIRTY_PAGES)
        assert isinstance(cpu.run(timeout=10), exits.Hlt)
        times.append(time.perf_counter() - start)
        vm.close()  # teardown is not part of either side
    return statistics.median(times)


def restore_vs_fresh(code: bytes, samples: int = 15) -> tuple:
    vm, cpu = _fresh(code, DIRTY_PAGES)
    snap = vm.snapshot()
    times = []
    for _ in range(samples):
        assert isinstance(cpu.run(timeout=10), exits.Hlt)  # dirties 64 pages
        start = time.perf_counter()
        vm.restore(snap)
        times.append(time.perf_counter() - start)
    vm.close()
    snap.close()
    return statistics.median(times), _fresh_to_the_same_point(code, 5)


def idle_restore(code: bytes, samples: int = 200) -> float:
    """restore() of a VM whose guest has not run and whose memory nobody
    wrote since the last restore: what a restore costs at the least."""
    vm, cpu = _fresh(code, DIRTY_PAGES)
    snap = vm.snapshot()
    vm.restore(snap)
    times = []
    for _ in range(samples):
        start = time.perf_counter()
        vm.restore(snap)
        times.append(time.perf_counter() - start)
    vm.close()
    snap.close()
    return statistics.median(times)


def clone_vs_fresh(code: bytes, samples: int = 10) -> tuple:
    """(a new clone, a prepared clone handed out, a fresh VM): seconds to a
    VM ready to run, medians."""
    vm, cpu = _fresh(code, DIRTY_PAGES)
    snap = vm.snapshot()
    cloned, handed_out = [], []
    for _ in range(samples):
        start = time.perf_counter()
        clone = pyvt.Vm.from_snapshot(snap)
        cloned.append(time.perf_counter() - start)
        clone.close()
    snap.prepare_clones(samples)
    for _ in range(samples):
        start = time.perf_counter()
        clone = pyvt.Vm.from_snapshot(snap)
        handed_out.append(time.perf_counter() - start)
        clone.close()
    vm.close()
    snap.close()
    fresh = []
    for _ in range(5):
        start = time.perf_counter()
        fresh_vm, _ = _fresh(code, DIRTY_PAGES)
        fresh.append(time.perf_counter() - start)
        fresh_vm.close()
    return statistics.median(cloned), statistics.median(fresh), statistics.median(handed_out)


def calls_per_second(code: bytes, calls: int) -> tuple:
    vm, cpu = _fresh(code)
    clean = vm.snapshot()
    start = time.perf_counter()
    for n in range(calls):
        n <<= 8  # low byte 0: clear of the guest's planted bug
        vm.memory.write(0x6000, n.to_bytes(8, "little"))
        cpu.run(timeout=10)
        assert vm.memory.read_int(0x6008) == (n * n + 7) & (2**64 - 1)
        vm.restore(clean)
    reset = calls / (time.perf_counter() - start)
    vm.close()
    clean.close()
    start = time.perf_counter()
    for n in range(calls // 10):
        n <<= 8
        fresh_vm, fresh_cpu = _fresh(code)
        fresh_vm.memory.write(0x6000, n.to_bytes(8, "little"))
        fresh_cpu.run(timeout=10)
        assert fresh_vm.memory.read_int(0x6008) == (n * n + 7) & (2**64 - 1)
        fresh_vm.close()
    fresh = (calls // 10) / (time.perf_counter() - start)
    return reset, fresh


def untouched_snapshot_cost(size: str = "1G") -> tuple:
    """(seconds, bytes the snapshot's memfds hold) for a VM whose guest has
    not run: the pages in use are the few that mode setup wrote."""
    with pyvt.Vm(size) as vm:
        vm.vcpu(0, mode="long")
        start = time.perf_counter()
        snap = vm.snapshot()
        seconds = time.perf_counter() - start
        held = sum(os.fstat(image.memfd).st_blocks * 512 for image in snap.regions)
        snap.close()
    return seconds, held


def report(rounds: int = 5, calls: int = 500) -> None:
    # The guest function of the tests and of examples/snapshot_calls.py.
    dirty = pyvt.assemble_file(str(HERE / "guests" / "dirty_pages.S"))
    function = pyvt.assemble_file(str(HERE.parent / "tests" / "guests" / "function.S"))
    restore, idle, clone, rate, cost = [], [], [], [], []
    for _ in range(rounds):
        restore.append(restore_vs_fresh(dirty))
        idle.append((idle_restore(dirty), restore[-1][1]))
        clone.append(clone_vs_fresh(dirty))
        rate.append(calls_per_second(function, calls))
        cost.append(untouched_snapshot_cost())

    def med(pairs, i):
        return statistics.median(p[i] for p in pairs)

    print(f"\nsnapshots ({MEMORY} VM, {rounds} rounds, medians)")
    print(f"{'restore, guest dirtied 64 pages, vs fresh VM to the same point':<64} "
          f"{med(restore, 0) * 1e3:8.2f} {med(restore, 1) * 1e3:8.2f} ms "
          f"{med(restore, 0) / med(restore, 1):6.3f}x  (target <= 0.1x)")
    print(f"{'restore, nothing dirtied since the last one (fixed cost)':<64} "
          f"{med(idle, 0) * 1e6:8.1f} {med(idle, 1) * 1e3:8.2f} us/ms "
          f"{med(idle, 0) / med(idle, 1):6.3f}x  (target <= 20 us)")
    print(f"{'from_snapshot() clone ready to run, vs fresh VM ready to run':<64} "
          f"{med(clone, 0) * 1e3:8.2f} {med(clone, 1) * 1e3:8.2f} ms "
          f"{med(clone, 0) / med(clone, 1):6.3f}x  (target <= 0.3x)")
    print(f"{'  the same from clones made ahead (snap.prepare_clones)':<64} "
          f"{med(clone, 2) * 1e3:8.2f} {med(clone, 1) * 1e3:8.2f} ms "
          f"{med(clone, 2) / med(clone, 1):6.3f}x  (target <= 0.3x)")
    print(f"{'guest function calls/s: reset between calls vs fresh VM each':<64} "
          f"{med(rate, 0):8.0f} {med(rate, 1):8.0f} /s {med(rate, 0) / med(rate, 1):6.1f}x more")
    print(f"{'snapshot() of an untouched 1 GiB VM: time, memory it holds':<64} "
          f"{med(cost, 0) * 1e3:8.2f} ms {med(cost, 1) / 1024:8.0f} KiB  (target < 500 ms, < 100 MiB)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=500)
    args = parser.parse_args()
    report(args.rounds, args.calls)
    return 0


if __name__ == "__main__":
    sys.exit(main())
