"""Random bytes as guest code: every run ends in a defined exit or a
pyvt.Error, never a crash of the process."""

import random

import pytest

import pyvt
from pyvt import exits

pytestmark = [pytest.mark.requires_kvm, pytest.mark.slow]

RUNS_PER_MODE = 150


@pytest.mark.parametrize("mode", ["real", "protected", "long"])
def test_random_code_ends_in_a_defined_way(mode):
    rng = random.Random(f"pyvt-fuzz-{mode}")
    outcomes = {}
    for _ in range(RUNS_PER_MODE):
        code = rng.randbytes(rng.randint(1, 64))
        # A fresh VM each time: random code may rewrite its own page tables.
        with pyvt.Vm("1M") as vm:
            vm.on_io(0x10, lambda e: 0)  # a Python handler in the way, too
            vm.memory.write(0x1000, code + b"\xf4")
            cpu = vm.vcpu(0, mode=mode)
            cpu.regs.rip = 0x1000
            try:
                exit = cpu.run(timeout=0.05)
            except pyvt.Error as e:
                exit = e
            assert isinstance(exit, (exits.Exit, pyvt.Error)), (code.hex(), exit)
            # The VM is still consistent enough to read back its state.
            cpu.regs.snapshot()
        outcomes[type(exit).__name__] = outcomes.get(type(exit).__name__, 0) + 1
    assert sum(outcomes.values()) == RUNS_PER_MODE
    # Random code does not all end the same way: the runs really ran.
    assert len(outcomes) > 1, outcomes
