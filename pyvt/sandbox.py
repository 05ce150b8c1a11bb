"""``pyvt.Sandbox``: call the functions of a freestanding x86-64 ELF by name,
each call starting from the same snapshot.

    with pyvt.Sandbox("guest.elf", memory="16M", ring=3) as sb:
        crc = sb.call("crc32", b"data", 4)
        sb.host_function("log", lambda text: print(text))

A small layer over :class:`pyvt.Vm`, snapshots and a long-mode vCPU (at
``ring=3`` the guest runs natively on software-assisted KVMs such as PVM):

- the ELF's ``PT_LOAD`` segments are loaded 1:1, its global function symbols
  become callable (:mod:`pyvt.loaders.elf_symbols`); nothing from pyvt is
  needed in the guest for plain functions;
- at the top of guest RAM pyvt keeps, from the bottom up, the argument
  arena, the stack and a page holding the return trampoline.  A call sets
  the SysV argument registers (rdi, rsi, rdx, rcx, r8, r9: integer and
  pointer arguments only, at most six), copies bytes-like arguments into the
  arena and passes their addresses, and enters the function with the
  trampoline's address as its return address.  The trampoline writes to the
  VM's native debug-exit port, which ends the run without any Python on the
  way; the result is rax;
- guests that include ``pyvt_guest.h`` (:func:`pyvt.get_include`) may call
  host functions (``pyvt_host_call``), which write to
  ``HOST_CALL_PORT``: that port has no handler, so the run returns to
  :meth:`Sandbox.call`, which calls the Python function and writes its
  result into the guest's ``struct pyvt_host_call``; and may define
  ``pyvt_init()``, called once before the snapshot;
- after each call the VM is restored to the snapshot (only the pages the
  call dirtied are copied back), unless ``reset=False`` or
  ``keep_state=True``.  A fault, a timeout or an exception from a host
  function always restores it.
"""

from __future__ import annotations

import difflib
import os
import re
import struct
import subprocess
import time
from typing import TYPE_CHECKING, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from . import _native, exits, modes, sandbox_calls
from .errors import (
    ArgumentError,
    ArgumentTypeError,
    ClosedError,
    GuestFault,
    SandboxError,
    SandboxTimeout,
)
from .loaders.common import RESERVED, LoaderError, check_placement, read_image_file, write_segments
from .loaders.elf import EM_X86_64, parse_elf
from .loaders.elf_symbols import FunctionSymbol, check_identity_linked, function_symbols
from .memory import parse_size
from .snapshot import note_copied_back
from .snapshot_memory import zero_bitmap
from .vcpu import disassemble
from .vm import DEBUG_EXIT_PORT, Vm

if TYPE_CHECKING:
    from .snapshot import Snapshot

INCLUDE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "include")
HEADER = os.path.join(INCLUDE_DIR, "pyvt_guest.h")


def _header_define(name: str) -> int:
    """The value of ``#define name`` in pyvt_guest.h (one source for both sides)."""
    with open(HEADER, encoding="ascii") as header:
        match = re.search(rf"^#define {name} (0x[0-9a-fA-F]+|\d+)$", header.read(), re.M)
    if match is None:
        raise ImportError(f"{HEADER} does not define {name}: the pyvt installation is broken")
    return int(match.group(1), 0)


#: The port ``pyvt_host_call`` writes to (from pyvt_guest.h).
HOST_CALL_PORT = _header_define("PYVT_HOST_CALL_PORT")
#: In a host call's ``described``: the argument count below this bit, then
#: one bit per argument that is a ``char *`` (from pyvt_guest.h).
STRING_ARGUMENTS_SHIFT = _header_define("PYVT_STRING_ARGUMENTS_SHIFT")
#: struct pyvt_host_call (pyvt_guest.h): name, described, result.
_HOST_CALL = struct.Struct("<QQQ")
_HOST_CALL_RESULT = 16
#: The guest function called once, if the ELF defines it, before the snapshot.
INIT_SYMBOL = "pyvt_init"
#: SysV x86-64 passes the first six integer/pointer arguments in these.
ARGUMENT_REGISTERS = ("rdi", "rsi", "rdx", "rcx", "r8", "r9")

PAGE = 0x1000
ARENA_ALIGNMENT = 16
#: ``out %al, $port`` to the debug-exit port, then ``hlt; jmp .-1`` in case
#: the run is resumed: the return address of every call.  At _PARKED, well
#: past the OUT, another ``hlt; jmp .-1``: where the snapshot's RIP points.
_TRAMPOLINE_OUT = 2
_PARKED = 32
_TRAMPOLINE = (bytes((0xE6, DEBUG_EXIT_PORT, 0xF4, 0xEB, 0xFD)).ljust(_PARKED, b"\xcc")
               + bytes((0xF4, 0xEB, 0xFD)))

#: SandboxCalls.run()'s stops for a call it reset itself.
_NATIVE_RESETS = (_native.SANDBOX_RESET_DONE, _native.SANDBOX_RESET_MEMORY)

#: The longest string a host function may be handed (``args=(str,)``).
MAX_STRING = 1 << 20
_MASK64 = (1 << 64) - 1

Argument = Union[int, bytes, bytearray, memoryview, None]
HostArgType = type  # int, str or bytes


def _registers(kinds: Sequence[HostArgType]) -> int:
    """How many guest arguments a host function's ``args`` take."""
    return sum(2 if kind is bytes else 1 for kind in kinds)


def _check_timeout(timeout: Optional[float]) -> Optional[float]:
    """``timeout`` if it is None or a non-negative number of seconds."""
    if timeout is None:
        return None
    if (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
            or not timeout >= 0):
        raise ArgumentError(f"timeout must be a non-negative number of seconds or None, "
                            f"not {timeout!r}")
    return timeout


def get_include() -> str:
    """The directory holding ``pyvt_guest.h``, for ``cc -I``."""
    return INCLUDE_DIR


#: How a guest is compiled and linked (as pyvt_guest.h says): freestanding,
#: static, not position-independent, no _start (pyvt enters by symbol).
GUEST_CFLAGS = ("-ffreestanding", "-nostdlib", "-static", "-fno-pie", "-no-pie", "-O2",
                "-fno-stack-protector", "-Wl,-e,0", "-Wl,--build-id=none")


def build_guest(sources: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]],
                output: Union[str, os.PathLike], *, cc: str = "cc",
                flags: Sequence[str] = ()) -> str:
    """Compiles C (or assembly) ``sources`` into a guest ELF at ``output``
    with the system compiler, :data:`GUEST_CFLAGS`, ``pyvt_guest.h`` on the
    include path and ``flags`` after them (e.g. ``-mgeneral-regs-only`` for
    ring-0 guests on hosts that emulate ring 0 without SSE).  Returns
    ``output``; raises :class:`pyvt.AssemblerError` with the compiler's
    message if the toolchain is missing or rejects the sources."""
    from .assemble import AssemblerError

    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    argv = [cc, *GUEST_CFLAGS, f"-I{INCLUDE_DIR}", *flags,
            *[os.fspath(source) for source in sources], "-o", os.fspath(output)]
    try:
        done = subprocess.run(argv, capture_output=True, text=True)
    except OSError as e:
        raise AssemblerError(f"cannot run {cc}: {e.strerror or e}; install a C compiler "
                             "(apt-get install gcc)") from None
    if done.returncode:
        raise AssemblerError(f"{' '.join(argv)} failed:\n{done.stderr.strip()}")
    return os.fspath(output)


class Sandbox:
    """A freestanding x86-64 ELF in a VM of its own, whose functions Python
    calls by name.

    ``elf`` is a path or the file's bytes: a static, non-PIE x86-64
    executable with its symbol table (not stripped).  ``memory`` is the
    VM's RAM; ``arena`` and ``stack`` the sizes of the argument arena and of
    the stack, both at the top of RAM.  ``ring`` is the privilege level the
    guest runs at (3: natively on PVM hosts; 0: emulated there, slow).
    ``reset`` (default True): every call starts from the snapshot taken
    after loading (and ``pyvt_init()``); False: each call starts where the
    last one left the VM (:meth:`reset` goes back).  ``timeout`` is the
    default per-call limit in seconds (None: none).  ``host_functions``
    maps names to functions (or ``(function, args)`` pairs) that the guest,
    including its ``pyvt_init()``, may call: see :meth:`host_function`.
    At ring 3, a call that returns through the trampoline with no other
    exit (no host function, no port I/O) is run and reset in one native
    call (:mod:`pyvt.sandbox_calls`): the pages it wrote are copied back,
    and, unless it wrote pyvt's reserved area (its page tables, GDT, IDT,
    TSS: the only way ring-3 code could reach CPL 0 and come back, which
    KVM's dirty log shows; then the reset is whole), only what CPL-3 code
    can change is written back: the general registers, and the segment
    registers and events where they differ.  The x87/SSE registers are
    reloaded from the snapshot's by pyvt's entry stub as each call starts
    from the snapshot (so between calls the vCPU holds the last call's;
    the function is entered with RAX = 0 and R10, R11 used by the stub).
    The TSC keeps counting across such calls.
    ``fast_reset=True`` (ring 3 only) is a promise about the guest: its
    functions run at CPL 3 only and never rewrite pyvt's page tables, GDT,
    IDT or TSS, so that nothing but an exception, which ends the call,
    reaches CPL 0.  Then the reset after a call that returned through
    Python (host functions, devices) also writes only what CPL-3 code can
    change (``vm.restore(..., user_mode_only=True)``), and the TSC and KVM
    clock keep running across calls.  A call that fails is still followed
    by a full reset.  Do not give it for guest code you do not trust.

    Attributes: ``vm`` and ``vcpu`` (the :class:`pyvt.Vm` and its
    :class:`pyvt.Vcpu`), ``functions`` (``{name: FunctionSymbol}``),
    ``arena_address``/``arena_size``, ``stack_top`` (a function is entered
    with RSP = ``stack_top - 8``, where its return address is) and
    ``trampoline_address``.  One thread at a time.
    """

    def __init__(self, elf: Union[str, os.PathLike, bytes], memory: Union[int, str] = "16M",
                 ring: int = 3, *, reset: bool = True, timeout: Optional[float] = None,
                 arena: Union[int, str] = "1M", stack: Union[int, str] = "256K",
                 host_functions: Optional[Mapping[str, object]] = None, backend=None,
                 fast_reset: bool = False):
        self._host: Dict[str, Tuple[Callable, Optional[Tuple[HostArgType, ...]]]] = {}
        self._snapshot: Optional["Snapshot"] = None
        self._native: Optional[_native.SandboxCalls] = None
        # VcpuFd.writes when the sandbox last put the snapshot back itself:
        # a write through sb.vcpu.fd since rules out the native reset.
        self._native_writes = -1
        self._calling = False
        self._at_snapshot = True  # the return address is in place
        self.reset_after_call = bool(reset)
        if fast_reset and ring != 3:
            raise ArgumentError(f"fast_reset=True is for ring-3 guests (ring=3), not "
                                f"ring={ring!r}: "
                                "at ring 0 a call can change any state")
        self.fast_reset = bool(fast_reset)
        self.timeout = _check_timeout(timeout)
        size = parse_size(memory)
        data = elf if isinstance(elf, (bytes, bytearray, memoryview)) else \
            read_image_file(elf, "guest ELF", size)
        self.path = None if isinstance(elf, (bytes, bytearray, memoryview)) else os.fspath(elf)
        self._layout(size, parse_size(arena), parse_size(stack))
        image = parse_elf(data, "guest ELF")
        if image.bits != 64 or image.machine != EM_X86_64:
            raise LoaderError("guest ELF is not an x86-64 executable: build it for x86-64 "
                              "(cc -m64)")
        check_identity_linked(bytes(data), "guest ELF")
        check_placement(image.segments, size, "guest ELF",
                        RESERVED + [(self.arena_address, size,
                                     "the sandbox's argument arena, stack and return "
                                     "trampoline (give it more memory, or a smaller arena)")])
        #: {name: FunctionSymbol} of every callable function.
        self.functions: Dict[str, FunctionSymbol] = function_symbols(data, "guest ELF")
        for name, spec in (host_functions or {}).items():
            function, args = spec if isinstance(spec, tuple) else (spec, None)
            self.host_function(name, function, args=args)
        self.vm = Vm(size, backend, pc_devices=False, debug_exit_port=DEBUG_EXIT_PORT)
        try:
            self.ring = ring
            self.vcpu = self.vm.vcpu(0, mode="long", ring=ring)
            self._exit_port = DEBUG_EXIT_PORT  # the VM's debug-exit port (made above)
            # Also what lets a reset leave the trampoline's port write for
            # the next call's KVM_RUN (Vcpu._defer_port_write).
            self.vcpu.track_user_mode_state()
            write_segments(self.vm.memory, image.segments)
            self.vm.memory.write(self.trampoline_address, _TRAMPOLINE)
            #: Whether calls enter through sandbox_calls' stub (ring 3; from
            #: the snapshot on, which holds the x87/SSE image it loads).
            self.uses_entry_stub = False
            stub = sandbox_calls.can_use_entry_stub(self)
            if stub:
                self.vm.memory.write(self.trampoline_address + sandbox_calls.ENTRY_STUB,
                                     sandbox_calls.entry_stub())
            # The return address every call finds at its entry RSP.
            self.vm.memory.write(self._entry_rsp, struct.pack("<Q", self.trampoline_address))
            if INIT_SYMBOL in self.functions:
                self._call(self.functions[INIT_SYMBOL], (), self.timeout, restore=False)
            # The snapshot's RIP (no call starts there) parks at a hlt loop
            # away from the trampoline's OUT, so that a reset need not
            # retire the OUT a call ended with (Vcpu._defer_port_write).
            self.vcpu.regs.rip = self.trampoline_address + _PARKED
            fxsave = sandbox_calls.fxsave_image(self.vcpu.save_state()) if stub else None
            if fxsave is not None:  # what the stub reloads: the x87/SSE state from now on
                self.vm.memory.write(self.trampoline_address + sandbox_calls.FXSAVE_IMAGE, fxsave)
                self.uses_entry_stub = True
            self._snapshot = self.vm.snapshot()
            self._at_snapshot = True
            self._native = sandbox_calls.native_calls(
                self, self._snapshot, self.trampoline_address + _TRAMPOLINE_OUT)
            self._native_writes = self.vcpu.fd.writes
        except BaseException:
            self.close()
            raise

    def _layout(self, size: int, arena: int, stack: int) -> None:
        """Places the arena, the stack and the trampoline page at the top of RAM."""
        if arena < 0 or stack < PAGE:
            raise ArgumentError(f"the sandbox needs a stack of at least {PAGE} bytes and "
                                f"an arena of 0 or more, not stack={stack}, arena={arena}")
        if size > modes.IDENTITY_MAPPED:
            raise ArgumentError(f"a sandbox's memory must lie in pyvt's identity-mapped "
                                f"{modes.IDENTITY_MAPPED >> 30} GiB, not {size:#x} bytes")
        self.trampoline_address = size - PAGE
        self.stack_top = self.trampoline_address
        self._entry_rsp = self.stack_top - 8  # SysV: rsp + 8 is 16-byte aligned at entry
        self.arena_size = arena - arena % ARENA_ALIGNMENT
        self.arena_address = (self.stack_top - stack) & ~(PAGE - 1)
        self.arena_address -= self.arena_size
        if self.arena_address < modes.SETUP_AREA_END:
            raise ArgumentError(
                f"{size:#x} bytes of memory cannot hold the sandbox's arena ({arena:#x}), "
                f"stack ({stack:#x}) and trampoline above pyvt's reserved area: give it "
                "more memory")

    # -- lifecycle -------------------------------------------------------------

    def close(self) -> None:
        """Frees the VM and the snapshot.  Idempotent."""
        self._native = None  # it holds the memory's and the snapshot's mappings
        if self._snapshot is not None:
            self._snapshot.close()
            self._snapshot = None
        vm = getattr(self, "vm", None)  # None: loading failed before the VM
        if vm is not None:
            vm.close()

    @property
    def closed(self) -> bool:
        return self._snapshot is None

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        what = self.path or "ELF from bytes"
        if self.closed:
            return f"<Sandbox {what}, closed>"
        return (f"<Sandbox {what}, {len(self.functions)} functions, ring {self.ring}, "
                f"{self.vm.memory.size >> 20} MiB>")

    def reset(self) -> None:
        """Puts the VM back to the snapshot taken after loading (for
        ``reset=False`` sandboxes, or after ``keep_state=True`` calls)."""
        self._reset(user_mode_only=False)

    def _reset(self, user_mode_only: bool) -> None:
        self.vm.restore(self._clean_state(), user_mode_only=user_mode_only)
        self._at_snapshot = True
        self._native_writes = self.vcpu.fd.writes

    def _clean_state(self) -> "Snapshot":
        """The snapshot every call starts from; raises ClosedError once closed."""
        if self._snapshot is None:
            raise ClosedError("this Sandbox is closed")
        return self._snapshot

    # -- host functions ----------------------------------------------------------

    def host_function(self, name: str, function: Callable,
                      args: Optional[Sequence[HostArgType]] = None) -> None:
        """Lets the guest call ``function`` as ``pyvt_host_call(name, ...)``
        (pyvt_guest.h).

        ``function`` gets the guest's arguments as the guest passed them
        (the header says which are ``char *``): a ``str`` for a C string (a
        NUL-terminated UTF-8 string), an ``int`` (unsigned 64-bit) for any
        other integer or pointer.  ``args`` says otherwise, one entry per
        parameter: ``int``, ``str`` (the register points to a C string) or
        ``bytes`` (two guest arguments: a pointer, then a length); the guest
        must then pass that many registers' worth.  ``function`` returns an
        int (or a bool, or None for 0), which the guest gets; an exception
        propagates out of :meth:`call` (the sandbox is restored).
        Registering a name again replaces it."""
        if not isinstance(name, str) or not name:
            raise ArgumentTypeError(f"a host function's name is a non-empty str, not {name!r}")
        if not callable(function):
            raise ArgumentTypeError(f"host function {name!r} must be callable, not "
                                    f"{function!r}")
        kinds = None if args is None else tuple(args)
        for kind in kinds or ():
            if kind not in (int, str, bytes):
                raise ArgumentTypeError(f"host function {name!r}: each of args is int, str "
                                        f"or bytes, not {kind!r}")
        if kinds is not None and _registers(kinds) > len(ARGUMENT_REGISTERS):
            raise ArgumentError(f"host function {name!r} takes {_registers(kinds)} registers "
                                f"of arguments (bytes take two); the guest passes at most "
                                f"{len(ARGUMENT_REGISTERS)}")
        self._host[name] = (function, kinds)

    # -- calls -----------------------------------------------------------------

    def call(self, function: str, *args: Argument, timeout: Optional[float] = None,
             keep_state: bool = False) -> int:
        """Calls the guest's ``function`` with ``args`` (SysV x86-64, at most
        six: ints, None for NULL, and bytes/bytearray/memoryview, copied into
        the arena and passed as pointers; a bytearray or writable memoryview
        gets the guest's changes back) and returns rax as an unsigned 64-bit
        int (mask it for narrower return types).

        ``timeout`` (seconds; default: the sandbox's) stops a guest that runs
        too long with :class:`pyvt.SandboxTimeout`.  A fault raises
        :class:`pyvt.GuestFault` with the registers and the instruction.  In
        every case the VM is then back at the snapshot, unless the call
        returned and ``keep_state`` is True (or the sandbox has
        ``reset=False``): then the next call starts from the state this one
        left.  Bad arguments raise :class:`pyvt.ArgumentError` before any
        guest code runs."""
        self._clean_state()
        if self._calling:
            raise SandboxError("Sandbox.call() is not reentrant: a host function cannot call "
                               "into the guest while the guest waits for it")
        symbol = self._lookup(function)
        seconds = _check_timeout(self.timeout if timeout is None else timeout)
        registers, copies, writebacks = self._marshal(function, args)
        self._calling = True
        try:
            return self._call(symbol, registers, seconds,
                              restore=self.reset_after_call and not keep_state,
                              copies=copies, writebacks=writebacks)
        finally:
            self._calling = False

    def _lookup(self, function: str) -> FunctionSymbol:
        if not isinstance(function, str):
            raise ArgumentTypeError(f"the function to call is named by a str, not {function!r}")
        symbol = self.functions.get(function)
        if symbol is None:
            close = difflib.get_close_matches(function, self.functions, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ArgumentError(f"the guest has no global function {function!r}{hint}; it "
                                f"defines {len(self.functions)}: see sandbox.functions")
        return symbol

    def _marshal(self, function: str, args: Sequence[Argument]):
        """(register values, [(arena address, bytes)] to copy in, [(arena
        address, view)] to copy back after the call)."""
        if len(args) > len(ARGUMENT_REGISTERS):
            raise ArgumentError(
                f"{function}() got {len(args)} arguments; SysV x86-64 passes the first "
                f"{len(ARGUMENT_REGISTERS)} in registers and pyvt's Sandbox supports only "
                "those (pass a struct in bytes for more)")
        values: List[int] = []
        copies: List[Tuple[int, bytes]] = []
        writebacks: List[Tuple[int, memoryview]] = []
        cursor = self.arena_address
        for position, arg in enumerate(args, 1):
            if arg is None:
                values.append(0)
            elif isinstance(arg, int):
                if not -(1 << 63) <= arg <= _MASK64:
                    raise ArgumentError(f"{function}() argument {position}: {arg} does not "
                                        "fit in a 64-bit register")
                values.append(arg & _MASK64)
            elif isinstance(arg, (bytes, bytearray, memoryview)):
                view = memoryview(arg)
                if not view.c_contiguous:
                    raise ArgumentError(f"{function}() argument {position}: the memoryview "
                                        "is not contiguous")
                view = view.cast("B")
                end = cursor + len(view)
                if end > self.arena_address + self.arena_size:
                    raise ArgumentError(
                        f"{function}() arguments need more than the arena's "
                        f"{self.arena_size} bytes (argument {position} ends at byte "
                        f"{end - self.arena_address}): make it larger, "
                        "Sandbox(..., arena='4M')")
                copies.append((cursor, bytes(view)))
                values.append(cursor)
                if not view.readonly:
                    writebacks.append((cursor, view))
                cursor = -(-end // ARENA_ALIGNMENT) * ARENA_ALIGNMENT
            else:
                hint = (": encode it (text.encode() + b'\\0' for a C string)"
                        if isinstance(arg, str) else
                        "; pyvt passes only integer and pointer arguments"
                        if isinstance(arg, float) else "")
                raise ArgumentTypeError(f"{function}() argument {position} is a "
                                        f"{type(arg).__name__}; pass an int, None or "
                                        f"bytes-like object{hint}")
        return values, copies, writebacks

    def _call(self, symbol: FunctionSymbol, registers: Sequence[int],
              timeout: Optional[float], restore: bool,
              copies: Sequence[Tuple[int, bytes]] = (),
              writebacks: Sequence[Tuple[int, memoryview]] = ()) -> int:
        """Copies the arguments in, runs ``symbol`` with ``registers`` to its
        return (serving host calls); restores the snapshot afterwards if
        ``restore``, and on any failure once there is one.  Where it can
        (sandbox_calls), the run and the reset after it are one native call."""
        cpu = self.vcpu
        regs = cpu.regs
        deadline = None if timeout is None else time.monotonic() + timeout
        native = self._native if (restore and not writebacks and self._native_ready()) \
            else None
        try:
            if native is not None and not native.enter(symbol.address, *registers):
                cpu._settle_pending_io()  # an access of the user's, not the trampoline's
                if not native.enter(symbol.address, *registers):
                    native = None
            if native is not None:
                for address, data in copies:
                    native.copy(address, data)
            else:
                for address, data in copies:
                    self.vm.memory.write(address, data)
                rip, values = self._entry(symbol, registers)
                cpu._enter(rip, values)
                if not self._at_snapshot:  # a kept call may have overwritten the return address
                    self.vm.memory.write(self._entry_rsp,
                                         struct.pack("<Q", self.trampoline_address))
            self._at_snapshot = False
            while True:
                left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
                stop = cpu._run_until_stop(left, None if native is None else native.run)
                if stop is not None and stop[0] in _NATIVE_RESETS:
                    return self._after_native_reset(*stop)
                if native is not None:  # the Python path takes over, and its reset
                    self._hand_over_host_writes(native)
                    native = None
                if stop is not None and restore and self._returned_stop(stop):
                    break  # the reset follows: no exit object needed
                exit = exits.Stopped(None) if stop is None else cpu._exit_of(stop, left)
                if isinstance(exit, exits.DebugExit) and self._returned(exit):
                    break
                if (isinstance(exit, exits.Io) and exit.port == HOST_CALL_PORT
                        and exit.direction == "out"):
                    self._host_call()
                    continue
                raise self._failure(symbol, exit, timeout)
            result = regs.rax
            for address, view in writebacks:
                view[:] = self.vm.memory.read(address, len(view))
        except BaseException:
            if native is not None:
                self._hand_over_host_writes(native)
            if self._snapshot is not None:  # else loading failed: nothing to go back to
                self.reset()
            raise
        if restore:
            # The call returned through the trampoline: with fast_reset, the
            # guest kept to CPL 3 (the promise), as in every call since the
            # last reset (a failed call resets in full).
            self._reset(user_mode_only=self.fast_reset)
        return result

    def _entry(self, symbol: FunctionSymbol,
               registers: Sequence[int]) -> Tuple[int, Dict[str, int]]:
        """(RIP, register values) entering ``symbol`` with ``registers``,
        through the entry stub where there is one (as SandboxCalls.enter)."""
        values = dict(zip(ARGUMENT_REGISTERS, registers, strict=False))
        values["rsp"] = self._entry_rsp
        # From the snapshot only: before it there is no image to load, and a
        # call after a kept one starts from the x87/SSE state that one left.
        if not self.uses_entry_stub or self._snapshot is None or not self._at_snapshot:
            return symbol.address, values
        values["r10"] = symbol.address
        values["r11"] = values.pop("rdx", 0)
        return self.trampoline_address + sandbox_calls.ENTRY_STUB, values

    def _native_ready(self) -> bool:
        """Whether the VM is exactly as the sandbox's last reset left it, so
        that the native path may run and reset the call: no write through
        ``vcpu.fd``, no memory written from the host, since."""
        if self._native is None or self._snapshot is None or not self._at_snapshot \
                or self.vcpu.fd.writes != self._native_writes:
            return False
        (region,) = self.vm.memory.regions
        return (region.baselines.get(self._snapshot.regions[0]) == 0
                and region.host_dirty is not None
                and region.host_dirty == zero_bitmap(len(region.host_dirty)))

    def _hand_over_host_writes(self, native: _native.SandboxCalls) -> None:
        """Tells pyvt.memory which pages the native path's argument copies
        wrote, for a call whose reset is the Python one: a host write is
        copied back only where memory knows of it (KVM's log does not see it)."""
        (region,) = self.vm.memory.regions
        written = int.from_bytes(native.take_host_writes(), "little")
        if written and region.host_dirty is not None:
            with self.vm.memory._dirty_lock:
                size = len(region.host_dirty)
                merged = int.from_bytes(region.host_dirty, "little") | written
                region.host_dirty[:] = merged.to_bytes(size, "little")

    def _after_native_reset(self, kind: int, rax: int, writes: int) -> int:
        """Bookkeeping after a call the native path reset: the pages it
        copied back count as written (for other snapshots and the dirty
        statistics), and the memory equals the snapshot's again; where the
        guest wrote pyvt's reserved area, the whole vCPU state is written
        back here."""
        vcpu, memory, native, snap = self.vcpu, self.vm.memory, self._native, self._snapshot
        assert native is not None and snap is not None  # _native_ready() said so
        vcpu.fd.writes += writes
        (region,) = memory.regions
        image = snap.regions[0]
        written = int.from_bytes(native.written, "little")
        with memory._dirty_lock:
            note_copied_back(memory, region, image, written)
        memory.dirty_rate.record_pages(written.bit_count())
        if kind == _native.SANDBOX_RESET_MEMORY:
            self.vm.restore(snap)
        self._at_snapshot = True
        self._native_writes = vcpu.fd.writes
        return rax

    def _returned_stop(self, stop: Tuple[int, int, int]) -> bool:
        """True for the trampoline's write, from the run loop's stop."""
        kind, _, port = stop
        return (kind == _native.STOP_DEVICE and port == self._exit_port
                and self._returned_at(self.vcpu._rip()))

    def _returned(self, exit: exits.DebugExit) -> bool:
        """True for the trampoline's write (not one of the guest's own)."""
        return self._returned_at(exit.rip)

    def _returned_at(self, rip: Optional[int]) -> bool:
        """True if ``rip``, at a debug-exit write, is the trampoline's."""
        return rip is not None and self.trampoline_address <= rip <= \
            self.trampoline_address + _TRAMPOLINE_OUT

    def _host_call(self) -> None:
        """Serves the guest's pyvt_host_call(): rax points at its struct
        pyvt_host_call, where the result goes."""
        regs = self.vcpu.regs
        frame = regs.rax
        name_address, described, _ = _HOST_CALL.unpack(
            self._read(frame, _HOST_CALL.size, "a host call's struct pyvt_host_call"))
        name = self._read_string(name_address, "the host function's name", 256)
        entry = self._host.get(name)
        if entry is None:
            known = ", ".join(sorted(self._host)) or "none"
            raise SandboxError(f"the guest called host function {name!r}, which is not "
                               f"registered (registered: {known}): "
                               f"sb.host_function({name!r}, fn)")
        function, kinds = entry
        count = described & ((1 << STRING_ARGUMENTS_SHIFT) - 1)
        if count > len(ARGUMENT_REGISTERS):
            raise SandboxError(f"the guest's call of host function {name!r} says it passes "
                               f"{count} arguments ({described:#x}): call it with "
                               "pyvt_host_call() from pyvt_guest.h")
        if kinds is None:
            kinds = tuple(str if described >> (STRING_ARGUMENTS_SHIFT + i) & 1 else int
                          for i in range(count))
        elif _registers(kinds) != count:
            raise SandboxError(f"the guest passed {count} argument(s) to host function "
                               f"{name!r}, whose args= take {_registers(kinds)}")
        raw = iter([getattr(regs, register) for register in ARGUMENT_REGISTERS[:count]])
        values: List[object] = []
        for kind in kinds:
            if kind is int:
                values.append(next(raw))
            elif kind is str:
                values.append(self._read_string(next(raw), f"{name}()'s string argument",
                                                MAX_STRING))
            else:
                address, length = next(raw), next(raw)
                values.append(self._read(address, length, f"{name}()'s bytes argument"))
        result = function(*values)
        if result is None:
            result = 0
        if not isinstance(result, int) or not -(1 << 63) <= result <= _MASK64:
            raise ArgumentTypeError(f"host function {name!r} returned {result!r}; it must "
                                    "return an int that fits in 64 bits (or None for 0)")
        self.vm.memory.write(frame + _HOST_CALL_RESULT, struct.pack("<Q", result & _MASK64))

    def _read(self, address: int, length: int, what: str) -> bytes:
        memory = self.vm.memory
        if address + length > memory.size:
            raise SandboxError(f"{what} at {address:#x}, {length} bytes, lies outside "
                               "guest memory")
        return memory.read(address, length)

    def _read_string(self, address: int, what: str, limit: int) -> str:
        memory = self.vm.memory
        end = min(address + limit, memory.size)
        if address >= end:
            raise SandboxError(f"{what} at {address:#x} lies outside guest memory")
        chunk = 256
        data = b""
        while address + len(data) < end:
            data += memory.read(address + len(data), min(chunk, end - address - len(data)))
            nul = data.find(b"\0")
            if nul >= 0:
                return data[:nul].decode("utf-8", "replace")
            chunk *= 4
        raise SandboxError(f"{what} at {address:#x} has no NUL in its first "
                           f"{end - address} bytes")

    # -- failures ----------------------------------------------------------------

    def locate(self, address: int) -> str:
        """``function+0xoffset`` for a guest code address, or its hex."""
        for symbol in self.functions.values():
            if address in symbol:
                return f"{symbol.name}+{address - symbol.address:#x}"
        return f"{address:#x}"

    def _failure(self, symbol: FunctionSymbol, exit, timeout) -> Exception:
        call = f"{symbol.name}()"
        if isinstance(exit, exits.Timeout):
            rip = exit.rip
            where = f" at {self.locate(rip)}" if rip is not None else ""
            return SandboxTimeout(f"{call} ran longer than its timeout of {timeout:g} s "
                                  f"(stopped{where}); the sandbox is back at its snapshot")
        if isinstance(exit, (exits.GuestException, exits.Shutdown, exits.InternalError)):
            return self._fault(call, exit)
        if isinstance(exit, exits.Hlt):
            return SandboxError(f"{call} executed hlt (at {self.locate((exit.rip or 1) - 1)}) "
                                "instead of returning")
        if isinstance(exit, exits.DebugExit):
            return SandboxError(f"{call} wrote {exit.code:#x} to the debug-exit port at "
                                f"{self.locate(exit.rip or 0)} instead of returning")
        return SandboxError(f"{call} stopped with {exit!r} instead of returning")

    def _fault(self, call: str, exit) -> GuestFault:
        if isinstance(exit, exits.Shutdown) and _reset_state(exit.regs):
            # AMD-V leaves the VMCB undefined after a shutdown: KVM (kvm-amd)
            # and pyvt.ko reset the vCPU, so where it faulted is gone.
            return GuestFault(
                f"{call} triple-faulted (at ring 0 pyvt has no IDT to tell which exception; "
                "ring=3 reports it); this backend resets the vCPU at a triple fault, as "
                "AMD-V does, so where it faulted is lost; the sandbox is back at its snapshot",
                exit, exit.regs)
        if isinstance(exit, exits.Shutdown):
            regs = exit.regs
            what = ("triple-faulted (at ring 0 pyvt has no IDT to tell which exception; "
                    "ring=3 reports it)")
        elif isinstance(exit, exits.InternalError):
            regs = exit.regs
            what = (f"stopped KVM ({exit.describe()}; a KVM that emulates ring-0 code, "
                    "such as PVM, may lack the instruction: ring=3 runs it natively, or "
                    "build the guest with -mgeneral-regs-only)")
        else:
            regs = self.vcpu.regs.snapshot()
            name = exits.GuestException.NAMES.get(exit.exception, f"vector {exit.exception}")
            what = f"took {name} (vector {exit.exception}, error code {exit.error_code:#x})"
            if exit.cr2 is not None:
                what += f" accessing {exit.cr2:#x}"
        rip = exit.rip if exit.rip is not None else (regs.rip if regs else 0)
        memory = self.vm.memory
        instruction = memory.read(rip, min(15, memory.size - rip)) if rip < memory.size else b""
        text = disassemble(instruction, rip, 64)
        location = self.locate(rip)
        message = (f"{call} {what} at {location}: "
                   f"{text or instruction.hex(' ') or '(outside guest memory)'}"
                   "; the sandbox is back at its snapshot")
        if regs is not None:
            message += "\n" + regs.dump()
        return GuestFault(message, exit, regs, instruction, text, location)


#: Where an x86 vCPU starts after a reset (CS base 0xffff0000): IP 0xfff0.
_RESET_IP = 0xFFF0


def _reset_state(regs) -> bool:
    """True for registers a reset left (the backend threw the fault's away)."""
    return regs is not None and regs.rip == _RESET_IP


__all__ = ["Sandbox", "get_include", "build_guest", "GUEST_CFLAGS", "HOST_CALL_PORT", "INIT_SYMBOL", "ARGUMENT_REGISTERS"]

