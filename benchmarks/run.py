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
import functools
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import dirty_log
import pyvt
import sandbox
import snapshots
from pyvt import exits
from pyvt.kvm import lib

HERE = Path(__file__).resolve().parent
UART_SCRATCH = 0x3FF  # a native-device register with no side effect


def user_seconds() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_utime


class Baseline:
    """raw_kvm.c, built twice: a program of its own, and a shared object run
    inside this process (same address space as pyvt, see raw_kvm.c)."""

    def __init__(self, workdir: Path):
        from cffi import FFI

        source = str(HERE / "raw_kvm.c")
        self.binary = workdir / "raw_kvm"
        library = workdir / "raw_kvm.so"
        subprocess.run(["cc", "-O2", "-o", str(self.binary), source], check=True)
        subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-DRAW_KVM_LIBRARY", "-o",
                        str(library), source], check=True)
        self.ffi = FFI()
        self.ffi.cdef("""
            double raw_exits(const uint8_t *code, size_t len, uint64_t count,
                             uint64_t port, double *user, uint64_t *exits);
            double raw_spawn(const uint8_t *code, size_t len, uint64_t count);
            double raw_lifecycle(const uint8_t *code, size_t len, uint64_t count);
        """)
        self.lib = self.ffi.dlopen(str(library))

    def run(self, mode: str, guest: Path, count: int, port: int = 0x10) -> dict:
        """The separate program."""
        out = subprocess.run([str(self.binary), mode, str(guest), str(count), hex(port)],
                             check=True, capture_output=True, text=True)
        return json.loads(out.stdout)

    def exits_here(self, code: bytes, count: int, port: int = 0x10) -> dict:
        """The exit loop, run by the shared object in this process."""
        user, exits = self.ffi.new("double *"), self.ffi.new("uint64_t *")
        seconds = self.lib.raw_exits(code, len(code), count, port, user, exits)
        return {"seconds": seconds, "user_seconds": user[0], "exits": exits[0]}

    def spawn_here(self, code: bytes, count: int) -> float:
        return self.lib.raw_spawn(code, len(code), count)

    def lifecycle_here(self, code: bytes, count: int) -> float:
        return self.lib.raw_lifecycle(code, len(code), count)


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


def pyvt_lifecycle(code: bytes, count: int) -> float:
    """Seconds per whole VM life: create, run to the first hlt, close."""
    start = time.perf_counter()
    for _ in range(count):
        with pyvt.Vm("1M") as vm:
            vm.memory.write(0x1000, code)
            cpu = vm.vcpu(0, mode="real")
            cpu.regs.rip = 0x1000
            exit = cpu.run()
            assert isinstance(exit, exits.Hlt), exit
    return (time.perf_counter() - start) / count


#: What forked scaling workers run: set before the pool forks.
_LIFECYCLE = {}


def _lifecycle_worker(count: int) -> float:
    return _LIFECYCLE["run"](count)


def vms_per_second(workers: int, count: int, one_batch) -> float:
    """VM lifecycles per second, host-wide, with ``workers`` processes each
    running ``one_batch(count)`` (which returns seconds per VM).  The
    processes are forked before the clock starts."""
    if workers == 1:
        return 1 / one_batch(count)
    import multiprocessing

    _LIFECYCLE["run"] = one_batch
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        pool.map(_lifecycle_worker, [1] * workers)  # warm: every worker is up
        start = time.perf_counter()
        pool.map(_lifecycle_worker, [count] * workers, chunksize=1)
        return workers * count / (time.perf_counter() - start)


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


CRC_BUFFER = 0x100000  # where the CRC guest's input goes (its table is at 0x8000)


def pyvt_crc(code: bytes, data: bytes, ring: int) -> float:
    """Seconds for the table-driven CRC-32 guest over ``data`` at ``ring``."""
    with pyvt.Vm(CRC_BUFFER + len(data) + (1 << 20)) as vm:
        vm.memory.write(0x1000, code)
        vm.memory.write(CRC_BUFFER, data)
        cpu = vm.vcpu(0, mode="long", ring=ring)
        cpu.regs.rip, cpu.regs.rsi, cpu.regs.rcx = 0x1000, CRC_BUFFER, len(data)
        elapsed = timed_run(cpu)[0]
        assert cpu.regs.rax & 0xFFFFFFFF == zlib.crc32(data)
        return elapsed


def unicorn_crc(code: bytes, data: bytes) -> float:
    from unicorn import UC_ARCH_X86, UC_MODE_64, Uc
    from unicorn.x86_const import UC_X86_REG_EAX, UC_X86_REG_RCX, UC_X86_REG_RSI

    emu = Uc(UC_ARCH_X86, UC_MODE_64)
    emu.mem_map(0, CRC_BUFFER + len(data) + (1 << 20))
    emu.mem_write(0x1000, code)
    emu.mem_write(CRC_BUFFER, data)
    emu.reg_write(UC_X86_REG_RSI, CRC_BUFFER)
    emu.reg_write(UC_X86_REG_RCX, len(data))
    start = time.perf_counter()
    emu.emu_start(0x1000, 0x1000 + len(code) - 1)  # stop at the final hlt
    elapsed = time.perf_counter() - start
    assert emu.reg_read(UC_X86_REG_EAX) == zlib.crc32(data)
    return elapsed


def pyvt_compute(code: bytes, count: int, ring: int = 0) -> float:
    with pyvt.Vm("16M") as vm:
        vm.memory.write(0x1000, code)
        cpu = vm.vcpu(0, mode="long", ring=ring)
        cpu.regs.rip = 0x1000
        cpu.regs.rcx = count
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


def ratio_row(name, ours, base, unit, scale, target=""):
    print(f"{name:<50} {median(ours) * scale:>9.2f} {median(base) * scale:>9.2f} {unit:<3}"
          f" {median(ours) / median(base):>6.2f}x  {target}")


def speedup_row(name, ours, base, target=""):
    print(f"{name:<50} {median(ours) * 1e3:>9.1f} {median(base) * 1e3:>9.1f} ms "
          f" {median(base) / median(ours):>6.2f}x faster {target}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="fewer iterations (smoke test)")
    args = parser.parse_args()
    scale = 10 if args.quick else 1
    exit_count, spawn_count = 20000 // scale, 40 // min(scale, 4)
    # Guest code is emulated instruction by instruction on software-assisted
    # KVM (PVM): keep the compute guest short enough for such hosts.
    console_count, compute_count = 100000 // scale, 500_000 // scale
    # At CPL 3 it runs natively there: a longer run gives a steadier figure.
    long_compute_count = 50_000_000 // scale
    crc_data = bytes(range(256)) * (40960 // scale)  # 10 MiB (1 MiB with --quick)

    r = {}

    def add(key, value):
        r.setdefault(key, []).append(value)

    with tempfile.TemporaryDirectory(prefix="pyvt-bench-") as tmp:
        workdir = Path(tmp)
        base = Baseline(workdir)
        guests = {name: guest_file(workdir, name)
                  for name in ("exit_loop", "hlt", "debugcon_print", "uart_print", "compute",
                                "crc32")}
        code = {name: path.read_bytes() for name, path in guests.items()}
        have_unicorn = ensure_unicorn(workdir)

        for _ in range(args.rounds):
            for key, result in (
                ("raw_process", base.run("exits", guests["exit_loop"], exit_count)),
                ("raw_here", base.exits_here(code["exit_loop"], exit_count)),
                ("native", pyvt_exits(code["exit_loop"], exit_count, python_handler=False)),
                ("python", pyvt_exits(code["exit_loop"], exit_count, python_handler=True)),
                ("naive", naive_python_exits(code["exit_loop"], exit_count)),
            ):
                add(key, result["seconds"] / result["exits"])
                add(key + "_user", result["user_seconds"] / result["exits"])
            add("spawn_process", base.run("spawn", guests["hlt"], spawn_count)["seconds_per_spawn"])
            add("spawn_here", base.spawn_here(code["hlt"], spawn_count))
            add("spawn", pyvt_spawn(code["hlt"], spawn_count)["seconds_per_spawn"])
            add("life_here", base.lifecycle_here(code["hlt"], spawn_count))
            add("life", pyvt_lifecycle(code["hlt"], spawn_count))
            for workers in (1, 2):
                add(f"rate_raw_{workers}", vms_per_second(
                    workers, spawn_count, functools.partial(base.lifecycle_here, code["hlt"])))
                add(f"rate_{workers}", vms_per_second(
                    workers, spawn_count, functools.partial(pyvt_lifecycle, code["hlt"])))
            add("dcon_raw", base.run("console", guests["debugcon_print"], console_count)["seconds"])
            add("dcon", pyvt_console(code["debugcon_print"], console_count, "debugcon")["seconds"])
            add("uart_raw", base.run("console", guests["uart_print"], console_count)["seconds"])
            add("uart", pyvt_console(code["uart_print"], console_count, "console")["seconds"])
            add("compute", pyvt_compute(code["compute"], compute_count))
            add("compute_ring3", pyvt_compute(code["compute"], compute_count, ring=3))
            add("compute_ring3_long", pyvt_compute(code["compute"], long_compute_count, ring=3))
            add("crc_ring3", pyvt_crc(code["crc32"], crc_data, ring=3))
            if have_unicorn:
                add("unicorn", unicorn_compute(code["compute"], compute_count))
                add("unicorn_long", unicorn_compute(code["compute"], long_compute_count))
                add("unicorn_crc", unicorn_crc(code["crc32"], crc_data))

    print(f"pyvt {pyvt.__version__}, backend {pyvt.select_backend()}, {args.rounds} rounds, medians")
    print("raw C 'here': the baseline as a shared object in this process; "
          "'own process': as a program\n")
    print(f"{'':<50} {'pyvt':>9} {'baseline':>9}     {'ratio':>6}")
    ratio_row("port-I/O exit, native device vs raw C here", r["native"], r["raw_here"], "us", 1e6,
              "(target <= 1.05x)")
    ratio_row("port-I/O exit, Python handler vs raw C here", r["python"], r["raw_here"], "us", 1e6,
              "(target <= 1.15x)")
    ratio_row("port-I/O exit, naive fcntl.ioctl loop vs raw C here", r["naive"], r["raw_here"],
              "us", 1e6)
    ratio_row("port-I/O exit, native device vs raw C own process", r["native"], r["raw_process"],
              "us", 1e6)
    # KVM_RUN's own time is system time, so user CPU is what a VMM adds.
    print(f"{'user CPU per exit: raw C / native / Python handler':<50} "
          f"{median(r['raw_here_user']) * 1e6:.2f} / {median(r['native_user']) * 1e6:.2f} / "
          f"{median(r['python_user']) * 1e6:.2f} us")
    ratio_row("VM spawn to first hlt vs raw C here", r["spawn"], r["spawn_here"], "ms", 1e3,
              "(target <= 1.3x)")
    ratio_row("VM spawn to first hlt vs raw C own process", r["spawn"], r["spawn_process"], "ms", 1e3)
    ratio_row("VM lifecycle: create, run to hlt, close vs raw C", r["life"], r["life_here"], "ms",
              1e3, "(target <= 1.3x)")
    for workers in (1, 2):
        rate, raw = median(r[f"rate_{workers}"]), median(r[f"rate_raw_{workers}"])
        print(f"{f'VM lifecycles per second, {workers} process(es)':<50} {rate:>9.0f} "
              f"{raw:>9.0f} /s  {rate / raw:>6.2f}x of raw C")
    speedup_row(f"{console_count} chars to the debug console (0xe9)", r["dcon"], r["dcon_raw"],
                "(target >= 5x)")
    speedup_row(f"{console_count} chars through the UART, LSR polled", r["uart"], r["uart_raw"],
                "(target >= 1.5x)")
    speedup_row(f"{compute_count} xorshift rounds, CPL 3 vs CPL 0 (ring=3)", r["compute_ring3"],
                r["compute"])
    if "unicorn" in r:
        speedup_row(f"{compute_count} xorshift rounds, CPL 0 vs unicorn", r["compute"],
                    r["unicorn"])
        speedup_row(f"{long_compute_count} xorshift rounds, CPL 3 vs unicorn",
                    r["compute_ring3_long"], r["unicorn_long"], "(target >= 4x)")
        speedup_row(f"table-driven CRC-32 of {len(crc_data) >> 20} MiB, CPL 3 vs unicorn",
                    r["crc_ring3"], r["unicorn_crc"], "(target >= 4x)")
    snapshots.report(rounds=args.rounds, calls=500 // scale)
    sandbox.report(rounds=args.rounds, calls=500 // scale)
    dirty_log.report(rounds=args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
