"""``pyvt caps --probe``: prove capabilities by running tiny guests.

Each probe is one row: a name, a guest, and what the host must see. A
probe reports ``ok``, ``unsupported`` (the backend or the library refused,
with the errno or exit) or ``failed`` (it ran and did the wrong thing), and
never raises.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

CODE_ADDR = 0x1000
PROBE_PORT = 0x10
MMIO_ADDR = 0x00400000  # above the 2 MiB of guest RAM the probes use

# mov al, 0x42 ; out 0x10, al ; hlt   (same bytes in 16-, 32- and 64-bit mode)
OUT_THEN_HLT = bytes([0xB0, 0x42, 0xE6, PROBE_PORT, 0xF4])
# hlt
HLT = bytes([0xF4])
# mov byte [0x00400000], 0x42 ; hlt   (32-bit protected mode, flat segments)
MMIO_WRITE_THEN_HLT = bytes([0xC6, 0x05]) + MMIO_ADDR.to_bytes(4, "little") + bytes([0x42, 0xF4])
# nop ; nop ; hlt   (single-step target)
NOP_NOP_HLT = bytes([0x90, 0x90, 0xF4])

PIO_ROUND_TRIPS = 200

# mov ecx, N (patched) ; l: xor eax, ecx ; rol eax, 7 ; dec ecx ; jnz l ; hlt   (64-bit)
_SPIN = bytes([0xB9, 0, 0, 0, 0, 0x31, 0xC8, 0xC1, 0xC0, 0x07, 0xFF, 0xC9, 0x75, 0xF7, 0xF4])
#: Rounds of _SPIN per ring: few at CPL 0, which software-assisted KVMs
#: (PVM) emulate at about a microsecond an instruction; at CPL 3 enough
#: (about 10 ms native) that the loop outweighs the exit's own jitter, which
#: on a loaded host reached the 0.25 ms 200,000 rounds took (the measured
#: difference came out 0).
CPL_ROUNDS = {0: 2000, 3: 8_000_000}
#: CPL 0 this many times slower per round than CPL 3 counts as emulated.
EMULATED_RATIO = 20


def _result(name: str, status: str, detail: str, **extra: Any) -> dict:
    return {"name": name, "status": status, "detail": detail, **extra}


def _exit_name(exit_obj: Any) -> str:
    return type(exit_obj).__name__


def _errno_of(exc: BaseException) -> int | None:
    return getattr(exc, "errno", None)


class _Probe:
    def __init__(self, device: str):
        import pyvt
        import pyvt.exits
        self.pyvt = pyvt
        self.exits = pyvt.exits
        self.device = device

    def vm(self, **kwargs: Any) -> Any:
        return self.pyvt.Vm(memory="2M", backend=self.device, **kwargs)

    def _isinstance(self, obj: Any, name: str) -> bool:
        cls = getattr(self.exits, name, None)
        return cls is not None and isinstance(obj, cls)

    # -- the probes ----------------------------------------------------------

    def mode(self, mode: str) -> dict:
        name = f"{mode}_mode"
        with self.vm() as vm:
            vm.memory.write(CODE_ADDR, OUT_THEN_HLT)
            cpu = vm.vcpu(0, mode=mode)
            cpu.regs.rip = CODE_ADDR
            first = cpu.run(timeout=1.0)
            if not self._isinstance(first, "Io") or first.port != PROBE_PORT:
                return _result(name, "failed", f"expected an Io exit on port {PROBE_PORT:#x}, got {first!r}")
            data = bytes(first.data)[:1]
            if data != b"\x42":
                return _result(name, "failed", f"port write carried {data!r}, expected b'\\x42'")
            second = cpu.run(timeout=1.0)
            if not self._isinstance(second, "Hlt"):
                return _result(name, "failed", f"expected Hlt after the port write, got {second!r}")
            return _result(name, "ok", f"OUT {PROBE_PORT:#x} then HLT in {mode} mode")

    def pio_exit(self) -> dict:
        """Median round trip of a port-I/O exit to Python and back."""
        # mov cx, N ; l: out 0x10, al ; dec cx ; jnz l ; hlt   (real mode)
        n = PIO_ROUND_TRIPS
        code = bytes([0xB9]) + n.to_bytes(2, "little") + bytes([0xE6, PROBE_PORT, 0x49, 0x75, 0xFB, 0xF4])
        with self.vm() as vm:
            vm.memory.write(CODE_ADDR, code)
            cpu = vm.vcpu(0, mode="real")
            cpu.regs.rip = CODE_ADDR
            samples = []
            for _ in range(n):
                t0 = time.perf_counter_ns()
                ex = cpu.run(timeout=1.0)
                samples.append(time.perf_counter_ns() - t0)
                if not self._isinstance(ex, "Io"):
                    return _result("pio_exit", "failed", f"exit {len(samples)} was {ex!r}, expected Io")
            last = cpu.run(timeout=1.0)
            if not self._isinstance(last, "Hlt"):
                return _result("pio_exit", "failed", f"expected Hlt after {n} port writes, got {last!r}")
            # The first exit includes vCPU warm-up: leave it out of the median.
            median_us = statistics.median(samples[1:]) / 1000.0
            return _result("pio_exit", "ok", f"median round trip {median_us:.1f} us over {n - 1} exits",
                           median_round_trip_us=round(median_us, 2), samples=n - 1)

    def mmio_exit(self) -> dict:
        with self.vm() as vm:
            vm.memory.write(CODE_ADDR, MMIO_WRITE_THEN_HLT)
            cpu = vm.vcpu(0, mode="protected")
            cpu.regs.rip = CODE_ADDR
            ex = cpu.run(timeout=1.0)
            if not self._isinstance(ex, "Mmio"):
                return _result("mmio_exit", "failed", f"expected an Mmio exit, got {ex!r}")
            addr = getattr(ex, "address", getattr(ex, "addr", None))
            if addr is not None and addr != MMIO_ADDR:
                return _result("mmio_exit", "failed", f"MMIO exit at {addr:#x}, expected {MMIO_ADDR:#x}")
            return _result("mmio_exit", "ok", f"write to unbacked {MMIO_ADDR:#x} exits as MMIO")

    def irqchip(self) -> dict:
        with self.vm() as vm:
            create = getattr(vm, "create_irqchip", None) or getattr(getattr(vm, "fd", None), "create_irqchip", None)
            if create is None:
                return _result("irqchip", "unsupported", "the pyvt API in use has no irqchip call")
            create()  # KVM_CREATE_IRQCHIP, before any vCPU exists
            vm.memory.write(CODE_ADDR, OUT_THEN_HLT)
            cpu = vm.vcpu(0, mode="real")
            cpu.regs.rip = CODE_ADDR
            ex = cpu.run(timeout=1.0)
            # With the in-kernel LAPIC, HLT is handled in the kernel: the OUT is what comes back.
            if not (self._isinstance(ex, "Io") and ex.port == PROBE_PORT):
                return _result("irqchip", "failed", f"expected the Io exit first, got {ex!r}")
            # The in-kernel LAPIC halts the vCPU inside KVM: no HLT exit, the run times out.
            ex = cpu.run(timeout=0.05)
            if self._isinstance(ex, "Timeout"):
                return _result("irqchip", "ok", "in-kernel irqchip: HLT is handled inside KVM")
            return _result("irqchip", "failed", f"HLT with an in-kernel irqchip gave {ex!r}, expected no exit")

    def smp(self) -> dict:
        with self.vm() as vm:
            vm.memory.write(CODE_ADDR, HLT)
            vm.memory.write(CODE_ADDR + 0x10, HLT)
            cpus = [vm.vcpu(i, mode="real") for i in (0, 1)]
            for i, cpu in enumerate(cpus):
                cpu.regs.rip = CODE_ADDR + 0x10 * i
            exits = [cpu.run(timeout=1.0) for cpu in cpus]
            if all(self._isinstance(e, "Hlt") for e in exits):
                return _result("smp", "ok", "2 vCPUs created and each ran to HLT")
            return _result("smp", "failed", f"exits were {exits!r}")

    def single_step(self) -> dict:
        with self.vm() as vm:
            vm.memory.write(CODE_ADDR, NOP_NOP_HLT)
            cpu = vm.vcpu(0, mode="real")
            cpu.regs.rip = CODE_ADDR
            set_guest_debug = getattr(getattr(cpu, "fd", None), "set_guest_debug", None)
            if set_guest_debug is None:
                return _result("single_step", "unsupported", "the pyvt API in use has no guest-debug call")
            from pyvt.kvm import lib  # type: ignore[attr-defined]
            set_guest_debug(lib.KVM_GUESTDBG_ENABLE | lib.KVM_GUESTDBG_SINGLESTEP)
            ex = cpu.run(timeout=1.0)
            if not self._isinstance(ex, "Debug"):
                return _result("single_step", "failed", f"expected a Debug exit, got {ex!r}")
            rip = cpu.regs.rip
            if rip != CODE_ADDR + 1:
                return _result("single_step", "failed", f"stopped at rip {rip:#x}, expected {CODE_ADDR + 1:#x}")
            return _result("single_step", "ok", "one NOP executed, Debug exit at the next instruction")


    def _ns_per_round(self, ring: int, rounds: int) -> float:
        """Guest time of one _SPIN round at ``ring``: a run of ``rounds``
        minus an empty run, so that the exit's own cost drops out."""
        def timed(n: int) -> int:
            with self.vm() as vm:
                vm.memory.write(CODE_ADDR, _SPIN[:1] + max(n, 1).to_bytes(4, "little") + _SPIN[5:])
                cpu = vm.vcpu(0, mode="long", ring=ring)
                cpu.regs.rip = CODE_ADDR
                cpu.run(timeout=1.0)  # warm: the first run maps pages in
                cpu.regs.rip = CODE_ADDR
                t0 = time.perf_counter_ns()
                ex = cpu.run(timeout=10.0)
                elapsed = time.perf_counter_ns() - t0
                if not self._isinstance(ex, "Hlt"):
                    raise RuntimeError(f"the CPL {ring} loop ended with {ex!r}, not Hlt")
                return elapsed
        return max(statistics.median(timed(rounds) - timed(1) for _ in range(3)), 1) / rounds

    def ring3(self) -> dict:
        """Ring-3 vCPUs run, and how fast CPL 0 and CPL 3 code runs: on
        software-assisted KVM (PVM) CPL 0 is emulated, CPL 3 native."""
        cpl0 = self._ns_per_round(0, CPL_ROUNDS[0])
        cpl3 = self._ns_per_round(3, CPL_ROUNDS[3])
        emulated = cpl0 > EMULATED_RATIO * cpl3
        how = ("CPL 0 is emulated, CPL 3 runs natively: use vm.vcpu(..., ring=3) for speed"
               if emulated else "CPL 0 and CPL 3 both run natively")
        return _result("ring3", "ok",
                       f"{how} ({cpl0:.1f} ns per loop round at CPL 0, {cpl3:.2f} at CPL 3)",
                       cpl0_ns_per_round=round(cpl0, 2), cpl3_ns_per_round=round(cpl3, 3),
                       cpl0_emulated=emulated)


def run_probe(device: str, only: list[str] | None = None) -> list[dict]:
    """Run every probe (or the names in *only*) against *device*."""
    try:
        p = _Probe(device)
    except Exception as exc:
        return [_result("probe", "unsupported",
                        f"the pyvt VM API is not available ({exc.__class__.__name__}: {exc})")]
    table: list[tuple[str, Callable[[], dict]]] = [
        ("real_mode", lambda: p.mode("real")),
        ("protected_mode", lambda: p.mode("protected")),
        ("long_mode", lambda: p.mode("long")),
        ("irqchip", p.irqchip),
        ("smp", p.smp),
        ("pio_exit", p.pio_exit),
        ("mmio_exit", p.mmio_exit),
        ("single_step", p.single_step),
        ("ring3", p.ring3),
    ]
    results = []
    for name, fn in table:
        if only is not None and name not in only:
            continue
        try:
            results.append(fn())
        except Exception as exc:
            results.append(_classify_failure(p, name, exc))
    return results


def _classify_failure(p: _Probe, name: str, exc: BaseException) -> dict:
    """Turn an exception into ``unsupported`` (refused) or ``failed`` (broke)."""
    code = _errno_of(exc)
    text = f"{exc.__class__.__name__}: {exc}"
    if code is not None:
        import errno as errno_mod
        text += f" (errno {code}, {errno_mod.errorcode.get(code, '?')})"
    refused = code is not None or isinstance(exc, (NotImplementedError, TypeError, AttributeError))
    pyvt_error = getattr(p.pyvt, "Error", None)
    if pyvt_error is not None and isinstance(exc, pyvt_error) and code is not None:
        refused = True
    return _result(name, "unsupported" if refused else "failed", text)
