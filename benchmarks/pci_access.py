#!/usr/bin/env python3
"""What the PCI layer costs per guest access, against its own baseline:

    python benchmarks/pci_access.py [--rounds N] [--count N]

A long-mode guest reads one 32-bit register ``count`` times in a loop:
- baseline: an MMIO register served by a bare ``vm.on_mmio`` handler;
- a Python PciDevice's BAR register (``on_bar_read`` through the bus);
- a configuration dword through ECAM (one exit);
- a configuration dword through 0xcf8/0xcfc (two exits: address, data).
Rounds alternate; it prints the median microseconds per access and the
ratio to the baseline.  Figures drift on shared machines: quote the ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time

import pyvt
from pyvt import exits, modes, pci

CODE = modes.LOAD_ADDRESS
PLAIN_MMIO = 0xD0000000


class Register(pci.PciDevice):
    def __init__(self):
        super().__init__(0x1234, 0x11E8, 0xFF0000)
        self.add_bar(0, 0x1000)

    def on_bar_read(self, index, offset, size):
        return 0x1234


def _loop(count: int, body: str) -> bytes:
    return pyvt.assemble(f"""
        mov ${count}, %ecx
    1:  {body}
        dec %ecx
        jnz 1b
        hlt
    """, at=CODE, name="pci_bench")


def _timed(body_for, count: int) -> float:
    """Seconds per loop iteration of the guest ``body_for(vm, device)`` makes."""
    with pyvt.Vm("16M") as vm:
        vm.on_mmio((PLAIN_MMIO, 0x1000), lambda e: 0x1234)
        device = Register()
        vm.pci.add(device)
        vm.memory.write(CODE, _loop(count, body_for(vm, device)))
        cpu = vm.vcpu(0, mode="long")
        cpu.regs.rip = CODE
        start = time.perf_counter()
        exit = cpu.run(timeout=600)
        seconds = time.perf_counter() - start
        assert isinstance(exit, exits.Hlt), exit
        return seconds / count


CASES = {
    "plain vm.on_mmio handler (baseline)":
        lambda vm, d: f"mov ${PLAIN_MMIO:#x}, %eax\n    mov (%rax), %eax",
    "PciDevice BAR read (on_bar_read)":
        lambda vm, d: f"mov ${d.bars[0].address:#x}, %eax\n    mov (%rax), %eax",
    "config dword through ECAM":
        lambda vm, d: f"mov ${pci.ECAM_BASE + (d.slot << 15):#x}, %eax\n    mov (%rax), %eax",
    "config dword through 0xcf8/0xcfc":
        lambda vm, d: (f"mov ${0x80000000 | d.slot << 11:#x}, %eax\n    mov $0xcf8, %dx\n"
                       "    out %eax, %dx\n    mov $0xcfc, %dx\n    in %dx, %eax"),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--count", type=int, default=2000)
    args = parser.parse_args()
    results = {name: [] for name in CASES}
    for _ in range(args.rounds):
        for name, body in CASES.items():
            results[name].append(_timed(body, args.count))
    base = statistics.median(results[next(iter(CASES))])
    print(f"pyvt {pyvt.__version__}, {args.rounds} rounds x {args.count} accesses, medians")
    for name, values in results.items():
        ours = statistics.median(values)
        print(f"{name:<40} {ours * 1e6:8.2f} us  {ours / base:5.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
