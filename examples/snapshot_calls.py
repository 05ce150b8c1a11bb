"""Call a guest function 100,000 times with different inputs, resetting the
VM to a clean snapshot between calls -- then fuzz it a little.

    python examples/snapshot_calls.py [CALLS]

The guest (tests/guests/function.S) reads n at 0x6000 and stores n*n + 7 at
0x6008; an n whose low byte is 0x42 triple-faults (a planted bug the fuzz
loop finds).
"""

import random
import sys
import time
from pathlib import Path

import pyvt
from pyvt import exits

GUEST = Path(__file__).resolve().parent.parent / "tests" / "guests" / "function.S"


def main(calls: int = 100_000) -> None:
    with pyvt.Vm(memory="16M") as vm:
        vm.memory.write(0x1000, pyvt.assemble_file(str(GUEST)))
        cpu = vm.vcpu(0, mode="long")
        cpu.regs.rip = 0x1000
        clean = vm.snapshot()  # the state every call starts from

        start = time.perf_counter()
        for n in range(calls):
            n <<= 8  # keep clear of the planted bug here
            vm.memory.write(0x6000, n.to_bytes(8, "little"))
            exit = cpu.run(timeout=5)
            assert isinstance(exit, exits.Hlt), exit
            assert vm.memory.read_int(0x6008) == (n * n + 7) % 2**64
            vm.restore(clean)  # only the pages this call dirtied are copied back
        elapsed = time.perf_counter() - start
        print(f"{calls} calls in {elapsed:.2f} s: {calls / elapsed:.0f} calls/s")

        # A coverage-free fuzz loop on the same snapshot: random inputs until
        # the guest crashes (any failure exit: a triple fault here).
        rng = random.Random(1)
        for tries in range(1, 100_001):
            n = rng.randrange(1 << 16)
            vm.memory.write(0x6000, n.to_bytes(8, "little"))
            exit = cpu.run(timeout=1)
            vm.restore(clean)
            if exit.failed:
                print(f"fuzz: input {n:#x} crashes the guest ({exit!r}) after {tries} tries")
                break


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000)
