#!/usr/bin/env python3
"""The same multiboot kernel under `pyvt boot` and under
`qemu-system-x86_64 -enable-kvm`, side by side:

    python benchmarks/boot_vs_qemu.py [--rounds N]

The kernel (benchmarks/kernels/io_bench.c) prints 131,072 characters through
the UART, polling LSR before each, then reads the ACPI PM timer 131,072
times, timing both with rdtsc; every one of those port accesses is an exit
to the VMM.  Prints guest cycles per operation under each VMM and the ratio
(pyvt / QEMU: lower is better), plus the wall time of each whole run.
QEMU is installed with apt-get if missing; on PVM hosts it needs
`-cpu qemu64` (plain `-cpu host` aborts there).
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from kernelbuild import build_kernel  # noqa: E402  (the tests' kernel builder)

QEMU = "qemu-system-x86_64"


def ensure_qemu() -> str:
    path = shutil.which(QEMU)
    if path is None:
        subprocess.run(["apt-get", "install", "-y", "-qq", "qemu-system-x86"], check=True,
                       stdout=subprocess.DEVNULL)
        path = shutil.which(QEMU)
    if path is None:
        sys.exit(f"{QEMU} is not available")
    return path


def figures(output: str) -> dict:
    found = dict(re.findall(r"^(uart_cycles_per_char|pm_cycles_per_read)=(\d+)", output, re.M))
    if len(found) != 2:
        raise RuntimeError(f"the kernel did not report its figures:\n{output[-2000:]}")
    return {k: int(v) for k, v in found.items()}


def run_pyvt(kernel: Path) -> tuple:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pyvt", "boot", str(kernel), "--memory", "128M",
                           "--timeout", "300", "--no-stdin"], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 1:  # debug-exit code 0 -> status 1, as QEMU
        raise RuntimeError(f"pyvt boot exited {done.returncode}: {done.stderr[-2000:]}")
    return figures(done.stdout), wall


def run_qemu(qemu: str, kernel: Path) -> tuple:
    start = time.perf_counter()
    done = subprocess.run([qemu, "-enable-kvm", "-cpu", "qemu64", "-m", "128M", "-smp", "1",
                           "-kernel", str(kernel), "-nographic", "-no-reboot", "-monitor", "none",
                           "-serial", "stdio", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600)
    wall = time.perf_counter() - start
    if done.returncode != 1:
        raise RuntimeError(f"qemu exited {done.returncode}: {done.stderr[-2000:]}")
    return figures(done.stdout), wall


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    qemu = ensure_qemu()
    with tempfile.TemporaryDirectory(prefix="pyvt-boot-bench-") as tmp:
        kernel = build_kernel("io_bench", Path(tmp), source=HERE / "kernels" / "io_bench.c")
        rows = {"pyvt": [], "qemu": []}
        for _ in range(args.rounds):  # alternate, so drift hits both alike
            rows["pyvt"].append(run_pyvt(kernel))
            rows["qemu"].append(run_qemu(qemu, kernel))

    def med(name, key):
        return statistics.median(r[0][key] for r in rows[name])

    print(f"same kernel, {args.rounds} rounds, medians (guest TSC cycles per operation)\n")
    print(f"{'':<40} {'pyvt':>10} {'QEMU/KVM':>10} {'ratio':>7}")
    for key, label, target in (("uart_cycles_per_char", "UART char, LSR polled", "no slower than QEMU"),
                               ("pm_cycles_per_read", "ACPI PM timer read", "target <= 1.0x")):
        ours, theirs = med("pyvt", key), med("qemu", key)
        print(f"{label:<40} {ours:>10} {theirs:>10} {ours / theirs:>6.2f}x  ({target})")
    walls = [statistics.median(r[1] for r in rows[n]) for n in ("pyvt", "qemu")]
    print(f"{'whole run, wall seconds':<40} {walls[0]:>10.2f} {walls[1]:>10.2f} "
          f"{walls[0] / walls[1]:>6.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
