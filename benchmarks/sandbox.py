"""Sandbox benchmarks (run by benchmarks/run.py through report(), or alone):

    python benchmarks/sandbox.py [--rounds N] [--calls N]

Calls per second of ``pyvt.Sandbox.call()`` at ring 3 for an empty function
and for a CRC-32 of 4 KiB (examples/sandbox/crc32.c: ``ping`` and
``crc32``), each call starting from the snapshot, against raw C doing the
same on a VM pyvt set up the same way (raw_sandbox.c: copy the argument into
the arena, set the registers, KVM_RUN to the trampoline's exit, copy back
the pages the call dirtied).  Rounds alternate pyvt and the baseline; the
figures are medians, and the ratio is pyvt's time per call over raw C's.
Each row is shown for the default reset and for ``fast_reset=True`` (the
guest's promise to stay at CPL 3: see pyvt.Sandbox).  Also shown: the time
per call of each side, and what the Python reset costs (the one a call that
went through Python, for a host function or a device, is followed by; a
call that returned alone is reset natively, inside its time per call).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import pyvt
from pyvt.sandbox import build_guest

HERE = Path(__file__).resolve().parent
GUEST = HERE.parent / "examples" / "sandbox" / "crc32.c"
CRC_BYTES = 4096
TARGET = 1.5

_RAW_CDEF = """
    struct raw_call {
        int vm_fd, vcpu_fd;
        void *run;
        uint8_t *memory;
        const uint8_t *pristine;
        uint64_t memory_size;
        uint32_t slot;
        uint16_t exit_port;
        uint64_t rip, rsp, rflags;
        uint64_t args[6];
        int nargs;
        const uint8_t *arg_data;
        uint64_t arg_len, arg_address;
    };
    double raw_sandbox_calls(const struct raw_call *c, uint64_t calls, uint64_t *result);
"""


class RawCalls:
    """raw_sandbox.c as a shared object in this process."""

    def __init__(self, workdir: Path):
        from cffi import FFI

        library = workdir / "raw_sandbox.so"
        subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", str(library),
                        str(HERE / "raw_sandbox.c")], check=True)
        self.ffi = FFI()
        self.ffi.cdef(_RAW_CDEF)
        self.lib = self.ffi.dlopen(str(library))

    def rate(self, elf: str, function: str, data: bytes, calls: int) -> float:
        """Calls per second of ``function`` (with ``data, len(data)`` if
        ``data``) on a fresh sandbox's VM, driven by raw C."""
        ffi = self.ffi
        with _sandbox(elf) as sb:
            memory = sb.vm.memory
            (region,) = memory.regions
            assert region.dirty_logging, "the snapshot turns KVM's dirty log on"
            pristine = memory.read(0, memory.size)
            run_page = ffi.from_buffer(sb.vcpu.fd.run_page)
            call = ffi.new("struct raw_call *")
            call.vm_fd, call.vcpu_fd = sb.vm.fd.fileno(), sb.vcpu.fd.fileno()
            call.run = run_page
            call.memory = ffi.cast("uint8_t *", region.host_address)
            keep = ffi.from_buffer(pristine), ffi.from_buffer(data)
            call.pristine, call.arg_data = keep
            call.memory_size, call.slot = memory.size, region.slot
            call.exit_port = sb.vm.debug_exit.port
            call.rip = sb.functions[function].address
            call.rsp = sb.stack_top - 8  # the return address is there
            call.rflags = sb.vcpu.regs.rflags
            if data:
                call.args[0:2] = [sb.arena_address, len(data)]
                call.nargs = 2
            call.arg_len, call.arg_address = len(data), sb.arena_address
            result = ffi.new("uint64_t *")
            seconds = self.lib.raw_sandbox_calls(call, calls, result)
            if seconds < 0:
                raise RuntimeError(f"raw_sandbox_calls failed ({seconds})")
            if data:
                assert result[0] & 0xFFFFFFFF == zlib.crc32(data), "raw C computed the CRC"
            return calls / seconds


def _sandbox(elf: str, fast_reset: bool = False) -> pyvt.Sandbox:
    return pyvt.Sandbox(elf, memory="16M", ring=3, fast_reset=fast_reset,
                        host_functions={"log": (lambda text: None, (str,))})


def pyvt_rate(elf: str, function: str, data: bytes, calls: int,
              fast_reset: bool = False) -> tuple:
    """(calls per second, seconds of the reset after a call), with
    ``Sandbox(fast_reset=...)``."""
    args = (data, len(data)) if data else ()
    with _sandbox(elf, fast_reset) as sb:
        for _ in range(10):  # warm up
            sb.call(function, *args)
        start = time.perf_counter()
        for _ in range(calls):
            result = sb.call(function, *args)
        rate = calls / (time.perf_counter() - start)
        if data:
            assert result == zlib.crc32(data)
        restore = 0.0
        for _ in range(calls // 5):
            sb.call(function, *args, keep_state=True)
            start = time.perf_counter()
            sb._reset(user_mode_only=fast_reset)  # after a call that went through Python
            restore += time.perf_counter() - start
        return rate, restore / (calls // 5)


def report(rounds: int = 5, calls: int = 500) -> None:
    data = bytes(range(256)) * (CRC_BYTES // 256)
    with tempfile.TemporaryDirectory() as work:
        elf = build_guest(GUEST, Path(work) / "crc32.elf")
        raw = RawCalls(Path(work))
        rows = {(f, fast): [] for f in ("ping", "crc32") for fast in (False, True)}
        for _ in range(rounds):
            for function, arg in (("ping", b""), ("crc32", data)):
                raw_rate = raw.rate(elf, function, arg, calls)
                for fast in (False, True):
                    rate, restore = pyvt_rate(elf, function, arg, calls, fast)
                    rows[function, fast].append((rate, raw_rate, restore))

    def med(function, i):
        return statistics.median(row[i] for row in rows[function])

    print(f"\nsandbox calls at ring 3 (examples/sandbox/crc32.c, {rounds} rounds of {calls} "
          "calls, medians), each from the snapshot: Sandbox.call vs raw C (set registers, "
          "KVM_RUN to the exit, copy back the dirtied pages)")
    for (function, fast), what in (
            (("ping", False), "empty function"), (("ping", True), "empty function, fast_reset"),
            (("crc32", False), "CRC-32 of 4 KiB"),
            (("crc32", True), "CRC-32 of 4 KiB, fast_reset")):
        key = function, fast
        pyvt_calls, raw_calls, restore = med(key, 0), med(key, 1), med(key, 2)
        print(f"{'calls/s, ' + what:<64} "
              f"{pyvt_calls:8.0f} {raw_calls:8.0f} /s {raw_calls / pyvt_calls:6.2f}x  "
              f"(target <= {TARGET}x)")
        print(f"{'  per call, pyvt and raw C (Python reset alone: ' + f'{restore * 1e6:.1f} us)':<64} "
              f"{1e6 / pyvt_calls:8.1f} {1e6 / raw_calls:8.1f} us")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=500)
    args = parser.parse_args()
    report(args.rounds, args.calls)
    return 0


if __name__ == "__main__":
    sys.exit(main())
