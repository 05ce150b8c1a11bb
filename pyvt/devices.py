"""Python handles on pyvt's native devices, and the descriptor that says
how a VM builds each one.

Every native device is a C pair in ``csrc/`` plus a class in
``pyvt/_native.pyx`` and runs with no Python on its path.  Its Python side is
a :class:`Device` handle (this module: the consoles, isa-debug-exit and the
port of ring-3 exception stubs; :mod:`pyvt.pc`: the PC devices) and one :class:`DeviceDescriptor` in
:data:`pyvt.device_model.DEVICES`, the table :class:`pyvt.Vm` and the
snapshots iterate.  A handle reads the device, configures it, saves and
loads its state, turns its stops into exits, and takes it off the bus.
"""

from __future__ import annotations

import io
import sys
import threading
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, List, NoReturn, Optional, Tuple, Type

from . import _native, exits, guest_exceptions
from .errors import ArgumentError, DeviceStateError, Error, SnapshotError

#: How much output a console keeps by default: its last MiB.
DEFAULT_OUTPUT_LIMIT: int = _native.DEFAULT_OUTPUT_LIMIT


@dataclass(frozen=True)
class DeviceDescriptor:
    """One native device, as a VM builds it: ``handle(vm, native(machine,
    port), name)`` is attached with every range of the native device (a
    native class may hold several, like the i8042's two ports), then becomes
    ``vm.devices[name]`` and the attribute ``vm.<name>``.

    Its state (:meth:`Device.save_state`, :meth:`Device.load_state`,
    checked by :meth:`Device.check_state`) goes into snapshots under
    ``name``; a run it stops becomes :meth:`Device.stop_exit`.
    """

    #: The device's one name: the ``vm`` attribute, the ``vm.devices`` key,
    #: the snapshot key and the owner named when its ports are taken.
    name: str
    #: The class in pyvt._native that drives the C device.
    native: Type[_native._Device]
    #: The Python handle class.
    handle: Type["Device"]
    #: Where it goes unless ``port_option`` says otherwise (C headers' number).
    port: int
    #: One of the standard PC devices, which ``Vm(pc_devices=False)`` omits.
    pc: bool = False
    #: The ``Vm()`` keyword that moves the device (a port) or omits it (None).
    port_option: Optional[str] = None
    #: KVM may queue writes to its first port (coalesced PIO), replayed in order.
    coalesced: bool = False

    def check_state(self, state: Any) -> Any:
        """``state`` if it is one this device's ``save_state()`` returns, else
        :class:`pyvt.DeviceStateError` saying which part is wrong."""
        return self.handle.check_state(state, self.native)


# -- checking a device state strictly (snapshot files, load_state) ----------

def _fail(where: str, what: str) -> NoReturn:
    raise DeviceStateError(f"{where} {what}".strip())


def state_fields(value, where: str, keys) -> Dict[str, Any]:
    """``value`` if it is a dict with exactly ``keys``."""
    if not isinstance(value, dict):
        _fail(where, f"is {type(value).__name__}, not an object")
    missing, extra = sorted(set(keys) - set(value)), sorted(set(value) - set(keys), key=str)
    if missing:
        _fail(where, f"lacks the field(s) {', '.join(missing)}")
    if extra:
        _fail(where, f"has unknown field(s) {', '.join(map(str, extra))}")
    return value


def state_items(value, where: str, length: Optional[int] = None) -> List[Any]:
    """``value`` if it is a list or tuple (of ``length`` items)."""
    if not isinstance(value, (list, tuple)):
        _fail(where, f"is {type(value).__name__}, not a list")
    if length is not None and len(value) != length:
        _fail(where, f"has {len(value)} items, not {length}")
    return list(value)


def state_int(value, where: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(where, f"is {value!r}, not an integer")
    if not low <= value <= high:
        _fail(where, f"is {value:#x}, outside {low:#x}-{high:#x}")
    return value


def state_bytes(value, where: str, size: Optional[int] = None) -> bytes:
    """``value`` if it is bytes (of ``size`` bytes)."""
    if not isinstance(value, bytes):
        _fail(where, f"is {type(value).__name__}, not bytes")
    if size is not None and len(value) != size:
        _fail(where, f"is {len(value)} bytes, not {size}: not this pyvt build's layout")
    return value


def state_copy(value: Any) -> Any:
    """A copy of a device state that later edits of ``value`` in place do
    not reach (its dicts, lists and tuples copied; bytes, ints and strs
    shared, bytearrays as bytes).  Anything else becomes an object equal to
    nothing: such a state is never taken as unchanged."""
    kind = type(value)
    if kind is bytes or kind is int or kind is str or kind is bool or value is None:
        return value
    if kind is dict:
        return {key: state_copy(item) for key, item in value.items()}
    if kind is list:
        return [state_copy(item) for item in value]
    if kind is tuple:
        return tuple(state_copy(item) for item in value)
    if kind is bytearray:
        return bytes(value)
    return object()


class HostAccess:
    """Counts the host's accesses to one VM's native devices (every
    :attr:`Device._native`), but for a restore's own; and keeps what the
    last restore put (see :func:`restore_states`)."""

    __slots__ = ("count", "restoring", "restored")

    def __init__(self) -> None:
        self.count = 0
        #: The thread whose restore_states is putting states, or None.
        self.restoring: Optional[int] = None
        #: (states, a copy of them or None, the vCPUs' KVM_RUN counts, count
        #: before the puts) from the last restore_states, or None.
        self.restored: Optional[tuple] = None


def host_access(vm) -> HostAccess:
    """``vm``'s :class:`HostAccess`, made on first use."""
    found = vm.__dict__.get("_device_access")
    if found is None:
        found = vm.__dict__["_device_access"] = HostAccess()
    return found


def restore_states(vm, states: Dict[str, Any], runs: Optional[tuple]) -> None:
    """Puts each of ``states`` ({name: state}, checked already) into
    ``vm``'s device of that name (a snapshot restore), unless every device
    provably holds its state already: the last call put this very dict,
    which is still equal to the copy kept then, no guest code ran since
    (``runs``, the vCPUs' KVM_RUN counts, are the same: the guest reaches a
    native device only inside KVM_RUN) and the host reached none of the
    native devices (:class:`HostAccess`: only through the handles).  The
    copy is made by a call that finds all but it unchanged, so the third
    of a row of restores with nothing between is the first to skip.
    ``runs`` None: every state is put, and nothing remembered.  Raises
    :class:`pyvt.SnapshotError` naming the device that is missing or refuses."""
    access = host_access(vm)
    held = access.restored
    again = False
    if held is not None and runs is not None:
        again = held[0] is states and held[2] == runs and held[3] == access.count
        if again and held[1] is not None and held[1] == states:
            return
    access.restored = None
    count = access.count  # another thread's access from here on is counted
    devices = vm._devices
    access.restoring = threading.get_ident()
    try:
        for name, state in states.items():
            device = devices.get(name)
            if device is None:
                raise SnapshotError(f"the snapshot has a {name} device but this VM has none "
                                    "(made with pc_devices=False?)")
            try:
                device._put_state(state)
            except Error as e:
                raise SnapshotError(f"cannot restore the {name} device's state: "
                                    f"{e}") from None
    finally:
        access.restoring = None
    if runs is not None:
        # The copy only once a restore finds nothing changed since the last
        # one (restores that follow runs would make it for nothing).
        access.restored = (states, state_copy(states) if again else None, runs, count)


# -- the handles ---------------------------------------------------------------

class Device:
    """The Python handle on a native device of ``vm``: ``name``, where it
    sits (``port``, ``ranges``), whether it is on the bus, and
    :meth:`detach`.  Subclasses add what the device does, reaching the
    native device through :attr:`_native` each time (never a reference
    kept elsewhere: a restore skips the device states only while nothing
    reached them, see :func:`restore_states`)."""

    def __init__(self, vm, native, name: str):
        self._vm = vm
        self._device = native
        #: The device's one name (see DeviceDescriptor.name).
        self.name = name
        self._access = host_access(vm)

    @property
    def _native(self):
        """The native device.  The host reaches it only through here (pyvt
        keeps no other reference to it but the bus's, which serves the
        guest), so whatever comes here may change it: counted, a restore
        puts every state back next time (see restore_states)."""
        access = self._access
        if access.restoring != threading.get_ident():
            access.count += 1
        return self._device

    @property
    def coalesced(self) -> bool:
        """True when KVM queues the guest's writes to the first port
        (coalesced PIO: a console's data register; from the guest's first
        write there on), replayed in order by the run loop."""
        return self._native.coalescing is not None

    @property
    def port(self) -> int:
        """Where the device's first range starts."""
        return self._native.base

    @property
    def ranges(self) -> Tuple[Tuple[int, int], ...]:
        """``((start, length), ...)``: every port range the device holds."""
        return tuple((start, length) for _, start, length in self._native.ranges)

    @property
    def attached(self) -> bool:
        return bool(self._native.attached)

    def __repr__(self) -> str:
        state = "attached" if self.attached else "detached"
        ports = ", ".join(f"{start:#x}" if length == 1 else f"{start:#x}-{start + length - 1:#x}"
                          for start, length in self.ranges)
        return f"<{type(self).__name__} {self.name} at {ports}, {state}>"

    def detach(self) -> None:
        """Takes the device off every port it holds, so that Python handlers
        (``vm.on_io``) can have them."""
        self._vm._detach_device(self)

    # -- what the VM calls ---------------------------------------------------

    def _start(self) -> None:
        """Sets the device up for its VM, once it is on the bus."""

    def _close(self) -> None:
        """Lets go of what the device holds outside the VM (the VM closes)."""

    def stop_exit(self, code: int, port: int, vcpu) -> exits.AnyExit:
        """The exit for ``vcpu``'s run, which this device stopped with
        ``code`` at ``port``."""
        return exits.Unhandled(-1, code, vcpu._rip())

    # -- state, for snapshots and clones -------------------------------------

    #: Whether the device has guest-visible state to save (False: the
    #: PM timer, which counts host time; isa-debug-exit).
    has_state: ClassVar[bool] = False

    def save_state(self) -> Any:
        """The device's guest-visible state: a value of dicts, lists, ints,
        strs and bytes that :meth:`load_state` takes back (here or in another
        VM) and a snapshot file stores."""
        raise NotImplementedError(f"the {self.name} device has no state")

    def load_state(self, state: Any) -> None:
        """Puts back what :meth:`save_state` returned (checked strictly first:
        :class:`pyvt.DeviceStateError` if it is not such a state)."""
        self._put_state(self._checked(state))

    def _put_state(self, state: Any) -> None:
        """Puts back a state already checked (:meth:`check_state`): a
        snapshot's, checked when it was taken or read from its file, so that
        a restore loop does not check it again each time."""
        raise NotImplementedError(f"the {self.name} device has no state")

    @classmethod
    def check_state(cls, state: Any, native: Any) -> Any:
        """``state`` if it is what :meth:`save_state` of a handle on a
        ``native`` device returns (lists may come as tuples and back), else
        :class:`pyvt.DeviceStateError` saying which part is wrong."""
        raise NotImplementedError(f"{cls.__name__} has no state")

    def _checked(self, state: Any) -> Any:
        return self.check_state(state, type(self._native))


class RegisterDevice(Device):
    """A device whose whole state is its registers, one C struct's bytes
    (its native class's ``save_state``/``load_state`` and ``STATE_SIZE``)."""

    has_state = True

    def save_state(self) -> bytes:
        return self._native.save_state()

    def _put_state(self, state: bytes) -> None:
        self._native.load_state(state)

    @classmethod
    def check_state(cls, state: Any, native: Any) -> bytes:
        return state_bytes(state, "registers", native.STATE_SIZE)


def check_output_limit(limit: Optional[int]) -> Optional[int]:
    """``limit`` if it is a usable output limit: bytes (0 or more) or None."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)
                              or limit < 0):
        raise ArgumentError(f"an output limit is a number of bytes (0 or more) or None "
                            f"for no limit, not {limit!r}")
    return limit


class Console(Device):
    """A character device whose guest output pyvt captures.

    ``output`` is the last ``limit`` bytes the guest wrote (1 MiB unless
    ``Vm(output_limit=...)`` or ``console.limit = ...`` says otherwise; None
    keeps everything), ``text`` the same decoded, ``dropped`` how many
    older bytes the limit let go.  ``stream(sys.stdout)`` also writes every
    byte there as it comes, whatever the limit.
    """

    has_state = True

    def __repr__(self) -> str:
        state = "attached" if self.attached else "detached"
        dropped = f", {self.dropped} dropped" if self.dropped else ""
        return (f"<Console {self.name} at {self.port:#x}, {state}, "
                f"{len(self.output)} bytes{dropped}>")

    def _start(self) -> None:
        if self._vm._output_limit != DEFAULT_OUTPUT_LIMIT:  # the sink starts with it
            self.limit = self._vm._output_limit

    def _close(self) -> None:
        self.stream(None)  # closes pyvt's duplicate of the stream's fd

    @property
    def output(self) -> bytes:
        """The guest's output since the last :meth:`clear`: all of it, or
        its last ``limit`` bytes once there was more (see ``dropped``)."""
        self._vm._sync_devices()
        return self._native.output()

    @property
    def text(self) -> str:
        """``output`` decoded as UTF-8 (undecodable bytes replaced)."""
        return self.output.decode("utf-8", "replace")

    @property
    def limit(self) -> Optional[int]:
        """The most bytes of output kept (older ones are dropped), or None to
        keep everything.  Setting it keeps the last ``limit`` bytes there are."""
        return self._native.limit

    @limit.setter
    def limit(self, limit: Optional[int]) -> None:
        self._vm._sync_devices()
        self._native.set_limit(check_output_limit(limit))

    @property
    def dropped(self) -> int:
        """How many bytes the guest wrote since the last :meth:`clear` that
        ``output`` no longer holds because of ``limit`` (0: nothing was cut)."""
        self._vm._sync_devices()
        return self._native.dropped

    def clear(self) -> None:
        """Forgets the output captured so far (and frees its memory), and
        resets ``dropped``."""
        self._vm._sync_devices()
        self._native.clear()

    def feed(self, data: bytes) -> int:
        """Queues input for the guest to read; returns how many bytes fit."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ArgumentError(f"console input must be bytes, not {type(data).__name__}")
        return self._native.feed(bytes(data))

    def stream(self, target: Any) -> None:
        """Writes every byte of guest output from now on, as it comes and in
        order, to ``target``: a file object, a file descriptor,
        ``"stdout"``/``"stderr"``, or None to stop.

        pyvt writes to its own duplicate of the descriptor: closing
        ``target`` does not stop the stream (call ``stream(None)``), and no
        file opened later under its number ever receives guest output.  The
        duplicate is closed when the stream stops, moves to another target,
        or the VM is closed (a pipe's reader sees EOF only then).  If a write
        fails (a closed pipe), streaming stops and the guest runs on.
        """
        if target is None:
            self._native.stream(-1)
            return
        self._vm._check_open()
        if target == "stdout":
            target = sys.stdout
        elif target == "stderr":
            target = sys.stderr
        if isinstance(target, int) and not isinstance(target, bool):
            fd = target
        else:
            try:
                if hasattr(target, "flush"):
                    target.flush()  # what Python wrote there comes first
                fd = target.fileno()
            except (AttributeError, ValueError, OSError, io.UnsupportedOperation):
                raise ArgumentError(
                    f"cannot stream to {target!r}: it needs an open file descriptor "
                    "(a file, a pipe, sys.stdout)") from None
        if not 0 <= fd < 2**31:
            raise ArgumentError(f"cannot stream to fd {fd}: it is not open")
        self._native.stream(fd)

    # -- state: the output kept (the debug console has no registers) -------

    def save_state(self) -> Dict[str, bytes]:
        return {"output": self._native.output()}

    def _put_state(self, state: Dict[str, bytes]) -> None:
        self._native.replace_output(state["output"])

    @classmethod
    def check_state(cls, state: Any, native: Any) -> Dict[str, bytes]:
        state_fields(state, "", ("output",))
        return {"output": state_bytes(state["output"], "output")}


#: The ports whose UART is on ISA line 3 (COM2, COM4); every other UART,
#: COM1 at 0x3f8 first, is on line 4.
COM2_LINE_PORTS = (0x2F8, 0x2E8)


class SerialConsole(Console):
    """The 16550 UART's console (``vm.console``): its state holds the UART's
    registers, pending interrupts, IRQ line level and receive FIFO besides the
    output.

    Its interrupt output drives ISA line :attr:`irq` (4 for COM1) of the
    VM's in-kernel irqchip, when the VM has one (``vm.fd.create_irqchip()``,
    ``vm.boot``): KVM_IRQ_LINE from C, following the line's level, from the
    vCPU thread or from the thread that calls :meth:`feed`."""

    def _start(self) -> None:
        super()._start()
        line = _native.UART_COM2_IRQ if self.port in COM2_LINE_PORTS else _native.UART_IRQ
        self._native.connect_irq(self._vm.fd.fileno(), line)

    def _close(self) -> None:
        self._native.connect_irq(-1, 0)  # the VM fd closes next: no late KVM_IRQ_LINE
        super()._close()

    @property
    def irq(self) -> int:
        """The ISA line (GSI) the UART raises: 4 for COM1, 3 for COM2."""
        return self._native.irq

    @property
    def irq_level(self) -> int:
        """The line's level now: 1 while an interrupt the guest enabled in
        IER is pending and MCR.OUT2 is set."""
        return self._native.irq_level

    def save_state(self) -> Dict[str, bytes]:
        return {"registers": self._native.save_state(), "output": self._native.output()}

    def _put_state(self, state: Dict[str, bytes]) -> None:
        # The line is driven only where the VM has the irqchip it goes to.
        self._native.load_state(state["registers"], self._vm.fd.has_irqchip)
        self._native.replace_output(state["output"])

    @classmethod
    def check_state(cls, state: Any, native: Any) -> Dict[str, bytes]:
        state_fields(state, "", ("registers", "output"))
        return {"registers": state_bytes(state["registers"], "registers", native.STATE_SIZE),
                "output": state_bytes(state["output"], "output")}


class DebugExit(Device):
    """QEMU's isa-debug-exit: a guest write of v stops ``run()`` with
    ``exits.DebugExit(code=v)``, whose ``status`` is ``(v << 1) | 1``."""

    def stop_exit(self, code: int, port: int, vcpu) -> exits.AnyExit:
        return exits.DebugExit(code, self.port, vcpu._rip())


class GuestExceptionPort(Device):
    """Where the exception stubs of ring-3 vCPUs report (an isa-debug-exit
    at ``guest_exceptions.EXCEPTION_PORT``): its stop becomes the exit
    :func:`pyvt.guest_exceptions.exit_from_frame` reads from the frame."""

    def stop_exit(self, code: int, port: int, vcpu) -> exits.AnyExit:
        return guest_exceptions.exit_from_frame(vcpu)


#: The devices every VM has (``debug_exit`` unless ``debug_exit_port=None``).
BASE_DEVICES = (
    DeviceDescriptor("console", _native.Uart, SerialConsole, _native.UART_PORT, coalesced=True),
    DeviceDescriptor("debugcon", _native.DebugCon, Console, _native.DEBUGCON_PORT,
                     coalesced=True),
    DeviceDescriptor("debug_exit", _native.DebugExit, DebugExit, _native.DEBUG_EXIT_PORT,
                     port_option="debug_exit_port"),
    DeviceDescriptor("guest_exceptions", _native.DebugExit, GuestExceptionPort,
                     guest_exceptions.EXCEPTION_PORT),
)


def __getattr__(name: str) -> Any:
    if name == "DebugExitDevice":  # its name before the device model (issue 13)
        warnings.warn("pyvt.devices.DebugExitDevice is now pyvt.devices.DebugExit",
                      DeprecationWarning, stacklevel=2)
        return DebugExit
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
