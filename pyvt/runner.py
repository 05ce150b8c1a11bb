"""``pyvt.run``: the one-liner for running a piece of flat machine code."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from . import exits
from .errors import ArgumentError, MemoryConfigError
from .modes import LOAD_ADDRESS
from .registers import Registers
from .vm import Vm


@dataclass(frozen=True)
class Result:
    """What ``pyvt.run`` saw: the final exit, the registers at that point and
    what the guest wrote to the UART (``console``) and to port 0xe9
    (``debugcon``): all of it, or its last MiB (see ``Console.limit``)."""

    exit: exits.AnyExit
    regs: Registers
    console: bytes = b""
    debugcon: bytes = b""

    @property
    def ok(self) -> bool:
        """True when the guest stopped with ``hlt`` or a debug-exit status of 1
        (code 0)."""
        if isinstance(self.exit, exits.DebugExit):
            return self.exit.code == 0
        return isinstance(self.exit, exits.Hlt)

    def check(self) -> "Result":
        """Raises :class:`pyvt.GuestError` if the guest failed."""
        self.exit.raise_for_failure()
        return self


def run(code: bytes, mode: str = "long", memory: Union[int, str] = "16M",
        timeout: Optional[float] = 5, *, at: int = LOAD_ADDRESS, backend=None,
        stream=None, ring: int = 0, gdb=None, control=None,
        name: Optional[str] = None) -> Result:
    """Runs flat machine ``code`` loaded at ``at`` in ``mode`` until it stops
    (``hlt``, debug-exit, an I/O nobody handles, a failure or ``timeout``).
    ``ring=3`` runs long-mode code at CPL 3 (see :meth:`pyvt.Vm.vcpu`).

    ``stream`` copies the output of the UART and of the debug console live
    to a file object (e.g. ``sys.stdout``).
    ``gdb`` (``"[HOST:]PORT"``) waits for gdb there before the first
    instruction and runs under it (:func:`pyvt.gdbstub.run_under_gdb`).
    ``control`` (a path) serves the VM's control socket there while it runs
    (:meth:`pyvt.Vm.serve_control`, registered as ``name``).
    """
    if not isinstance(code, (bytes, bytearray, memoryview)):
        raise ArgumentError(f"code must be bytes, not {type(code).__name__}")
    if isinstance(at, bool) or not isinstance(at, int) or at < 0:
        raise ArgumentError(f"load address must be a non-negative int, not {at!r}")
    with Vm(memory=memory, backend=backend) as vm:
        if at + len(code) > vm.memory.size:
            raise MemoryConfigError(
                f"{len(code)} bytes at {at:#x} do not fit in {vm.memory.size:#x} bytes of memory")
        vm.memory.write(at, code)
        cpu = vm.vcpu(0, mode=mode, ring=ring)
        if mode == "real":
            # CS:IP must reach the code: put CS at the 64 KiB page holding it.
            if at >= 1 << 20:
                raise ArgumentError(f"real-mode code must sit below 1 MiB, not at {at:#x}")
            cpu.sregs.cs.selector = (at >> 4) & 0xF000
            cpu.sregs.cs.base = at & 0xF0000
            cpu.regs.rip = at & 0xFFFF
        else:
            cpu.regs.rip = at
        if stream is not None:
            vm.console.stream(stream)
            vm.debugcon.stream(stream)
        if control is not None:
            vm.serve_control(control, name)
        # vm.run(), not cpu.run(): the control socket can pause and end it.
        if gdb is not None:
            from .gdbstub import run_under_gdb

            exit = run_under_gdb(vm, gdb, lambda: vm.run(timeout=timeout))
        else:
            exit = vm.run(timeout=timeout)
        return Result(exit, cpu.regs.snapshot(), vm.console.output, vm.debugcon.output)
