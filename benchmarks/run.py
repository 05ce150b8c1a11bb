#!/usr/bin/env python3
"""pyvt's benchmarks, side by side with their baselines, in one command:

    python benchmarks/run.py [--rounds N] [--quick]

Builds the raw-C baseline (raw_kvm.c: the same guests driven by bare KVM
ioctls) with the system compiler, then alternates pyvt and the baseline round
by round and prints medians and ratios.  Unicorn (for the emulator
comparison) is installed into a throwaway directory if missing; it is not a
dependency of pyvt.  Figures drift on shared machines: quote the ratios.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyvt
from pyvt import exits
from pyvt.kvm import lib

HERE = Path(__file__).resolve().parent
UART_SCRATCH = 0x3FF  # a native-device register with no side effect


def user_seconds() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_utime


class Baseline:
    """The compiled raw-C program."""

    def __init__(self, workdir: Path):
        self.binary = workdir / "raw_kvm"
        subprocess.run(["cc", "-O2", "-o", str(self.binary), str(HERE / "raw_kvm.c")],
                       check=True)

    def run(self, mode: str, guest: Path, count: int, port: int = 0x10) -> dict:
        out = subprocess.run([str(self.binary), mode, str(guest), str(count), hex(port)],
                             check=True, capture_output=True, text=True)
        return json.loads(out.stdout)


def guest_file(workdir: Path, name: str) -> Path:
    path = workdir / f"{name}.bin"
    if not path.exists():
        path.write_bytes(pyvt.assemble_file(str(HERE / "guests" / f"{name}.S")))
    return path


def pyvt_vcpu(vm, code: bytes, count: int, port: int, mode: str = "real"):
    vm.memory.write(0x1000, code)
    cpu = vm.vcpu(0, mode=mode)
    cpu.regs.rip = 0x1000
    cpu.regs.rcx = count
    cpu.regs.rdx = port
    return cpu


def timed_run(cpu):
    user, start = user_seconds(), time.perf_counter()
    exit = cpu.run()
    elapsed, user = time.perf_counter() - start, user_seconds() - user
    assert isinstance(exit, exits.Hlt), exit
    return elapsed, user


def pyvt_exits(code: bytes, count: int, python_handler: bool) -> dict:
    with pyvt.Vm("1M") as vm:
        port = 0x10 if python_handler else UART_SCRATCH
        if python_handler:
            vm.on_io(0x10, lambda exit: None)
        cpu = pyvt_vcpu(vm, code, count, port)
        elapsed, user = timed_run(cpu)
        return {"seconds": elapsed, "user_seconds": user, "exits": count}


def naive_python_exits(code: bytes, count: int) -> dict:
    """What people write by hand: fcntl.ioctl(KVM_RUN) in a Python loop."""
    with pyvt.Vm("1M") as vm:
        vm.console.detach()
        cpu = pyvt_vcpu(vm, code, count, 0x10)
        cpu.run(timeout=0)  # let pyvt write the registers before going raw
        fd, page = cpu.fd.fileno(), cpu.fd.run_page
        offset = pyvt.kvm.ffi.offsetof("struct kvm_run", "exit_reason")
        n = 0
        user, start = user_seconds(), time.perf_counter()
        while True:
            fcntl.ioctl(fd, lib.KVM_RUN, 0)
            reason = int.from_bytes(page[offset:offset + 4], "little")
            if reason == lib.KVM_EXIT_IO:
                n += 1
            elif reason == lib.KVM_EXIT_HLT:
                break
        elapsed, user = time.perf_counter() - start, user_seconds() - user
        return {"seconds": elapsed, "user_seconds": user, "exits": n}


def pyvt_spawn(code: bytes, count: int) -> dict:
    total = 0.0
    for _ in range(count):
        start = time.perf_counter()
        vm = pyvt.Vm("1M")
        vm.memory.write(0x1000, code)
        cpu = vm.vcpu(0, mode="real")
        cpu.regs.rip = 0x1000
        exit = cpu.run()
        total += time.perf_counter() - start
        assert isinstance(exit, exits.Hlt), exit
        vm.close()  # teardown is not part of a spawn, as in the baseline
    return {"seconds_per_spawn": total / count}


def pyvt_console(code: bytes, count: int, which: str) -> dict:
    with pyvt.Vm("1M") as vm:
        cpu = pyvt_vcpu(vm, code, count, 0)
        elapsed, user = timed_run(cpu)
        output = getattr(vm, which).output
        assert output == b"x" * count, (len(output), output[:20])
        return {"seconds": elapsed, "user_seconds": user, "exits": cpu.stats["kvm_exits"]}


def unicorn_compute(code: bytes, count: int) -> float:
    from unicorn import UC_ARCH_X86, UC_MODE_64, Uc
    from unicorn.x86_const import UC_X86_REG_RCX

    emu = Uc(UC_ARCH_X86, UC_MODE_64)
    emu.mem_map(0, 2 << 20)
    emu.mem_write(0x1000, code)
    emu.reg_write(UC_X86_REG_RCX, count)
    start = time.perf_counter()
    emu.emu_start(0x1000, 0x1000 + len(code) - 1)  # stop at the final hlt
    return time.perf_counter() - start


def pyvt_compute(code: bytes, count: int) -> float:
    with pyvt.Vm("16M") as vm:
        cpu = pyvt_vcpu(vm, code, count, 0, mode="long")
        return timed_run(cpu)[0]


def ensure_unicorn(workdir: Path) -> bool:
    try:
        import unicorn  # noqa: F401
        return True
    except ImportError:
        pass
    target = workdir / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--target",
                           str(target), "unicorn"], capture_output=True, text=True)
    if done.returncode:
        print(f"(unicorn unavailable: {done.stderr.strip().splitlines()[-1:]})")
        return False
    sys.path.insert(0, str(target))
    return True


def median(values):
    return statistics.median(values)


def row(name, ours, base, unit, scale, target=""):
    ratio = median(ours) / median(base)
    print(f"{name:<44} {median(ours) * scale:>9.2f} {median(base) * scale:>9.2f} {unit:<6}"
          f" {ratio:>6.2f}x  {target}")
    return ratio


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="fewer iterations (smoke test)")
    args = parser.parse_args()
    scale = 10 if args.quick else 1
    exit_count, spawn_count = 20000 // scale, 40 // min(scale, 4)
    console_count, compute_count = 100000 // scale, 5_000_000 // scale

    with tempfile.TemporaryDirectory(prefix="pyvt-bench-") as tmp:
        workdir = Path(tmp)
        base = Baseline(workdir)
        guests = {name: guest_file(workdir, name)
                  for name in ("exit_loop", "hlt", "debugcon_print", "uart_print", "compute")}
        code = {name: path.read_bytes() for name, path in guests.items()}
        have_unicorn = ensure_unicorn(workdir)

        results = {k: [] for k in ("raw", "native", "python", "naive", "raw_user", "native_user",
                                   "python_user", "spawn_raw", "spawn", "dcon_raw", "dcon",
                                   "uart_raw", "uart", "compute", "unicorn")}
        for _ in range(args.rounds):
            raw = base.run("exits", guests["exit_loop"], exit_count)
            native = pyvt_exits(code["exit_loop"], exit_count, python_handler=False)
            python = pyvt_exits(code["exit_loop"], exit_count, python_handler=True)
            naive = naive_python_exits(code["exit_loop"], exit_count)
            for key, r in (("raw", raw), ("native", native), ("python", python), ("naive", naive)):
                results[key].append(r["seconds"] / r["exits"])
                if key != "naive":
                    results[key + "_user"].append(r["user_seconds"] / r["exits"])
            results["spawn_raw"].append(base.run("spawn", guests["hlt"], spawn_count)["seconds_per_spawn"])
            results["spawn"].append(pyvt_spawn(code["hlt"], spawn_count)["seconds_per_spawn"])
            results["dcon_raw"].append(base.run("console", guests["debugcon_print"], console_count)["seconds"])
            results["dcon"].append(pyvt_console(code["debugcon_print"], console_count, "debugcon")["seconds"])
            results["uart_raw"].append(base.run("console", guests["uart_print"], console_count)["seconds"])
            results["uart"].append(pyvt_console(code["uart_print"], console_count, "console")["seconds"])
            results["compute"].append(pyvt_compute(code["compute"], compute_count))
            if have_unicorn:
                results["unicorn"].append(unicorn_compute(code["compute"], compute_count))

    print(f"pyvt {pyvt.__version__}, backend {pyvt.select_backend()}, {args.rounds} rounds, medians\n")
    print(f"{'':<44} {'pyvt':>9} {'baseline':>9} {'unit':<6} {'ratio':>7}")
    row("port-I/O exit, native device vs raw C", results["native"], results["raw"], "us", 1e6, "(target <= 1.05x)")
    row("port-I/O exit, Python handler vs raw C", results["python"], results["raw"], "us", 1e6, "(target <= 1.15x)")
    row("port-I/O exit, naive fcntl.ioctl loop vs raw C", results["naive"], results["raw"], "us", 1e6)
    # KVM_RUN's own time is system time, so user CPU is what a VMM adds.
    print(f"{'user CPU per exit: raw C / native / Python':<44} "
          f"{median(results['raw_user']) * 1e6:>6.2f} / {median(results['native_user']) * 1e6:.2f} / "
          f"{median(results['python_user']) * 1e6:.2f} us")
    row("VM spawn to first hlt vs raw C", results["spawn"], results["spawn_raw"], "ms", 1e3, "(target <= 1.3x)")
    n = console_count
    speedup = median(results["dcon_raw"]) / median(results["dcon"])
    print(f"{f'{n} chars to debug console (0xe9)':<44} {median(results['dcon']) * 1e3:>9.1f} "
          f"{median(results['dcon_raw']) * 1e3:>9.1f} {'ms':<6} {speedup:>6.2f}x faster (target >= 5x)")
    speedup = median(results["uart_raw"]) / median(results["uart"])
    print(f"{f'{n} chars through the UART, LSR polled':<44} {median(results['uart']) * 1e3:>9.1f} "
          f"{median(results['uart_raw']) * 1e3:>9.1f} {'ms':<6} {speedup:>6.2f}x faster (target >= 1.5x)")
    if results["unicorn"]:
        speedup = median(results["unicorn"]) / median(results["compute"])
        print(f"{f'{compute_count} xorshift rounds vs unicorn':<44} {median(results['compute']) * 1e3:>9.1f} "
              f"{median(results['unicorn']) * 1e3:>9.1f} {'ms':<6} {speedup:>6.1f}x faster")
    return 0


if __name__ == "__main__":
    sys.exit(main())
