# cython: language_level=3, boundscheck=False, wraparound=False
"""The Cython bridge between pyvt's Python API and its native core (csrc/).

The vCPU run loop lives in C (``pvt_vcpu_run``); this module calls it with the
GIL released and comes back to Python only at safe points: a Python handler's
range, an exit nobody claimed, a native device that stops the run, or a kick
(timeout, Ctrl-C).  A handler that raises is never unwound through C: the C
loop has already returned when the handler runs.
"""

from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcpy, memset
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.exc cimport PyErr_CheckSignals

from pyvt.includes.core cimport *

import errno
import os
import reprlib

from pyvt.errors import (
    ArgumentError,
    ArgumentTypeError,
    ClosedError,
    DeviceError,
    DeviceStateError,
    Error,
    KvmError,
    MsrFault,
    RegionOverlapError,
)

# What VcpuLoop.run() reports, besides the enum pvt_stop values.
STOP_EXIT = PVT_STOP_EXIT
STOP_DEVICE = PVT_STOP_DEVICE
STOP_TIMEOUT = 100
STOP_ERROR = 101
STOP_REQUESTED = 102
STOP_BAD_EXIT = PVT_STOP_BAD_EXIT
EXIT_REASON_SLOTS = PVT_EXIT_REASON_SLOTS

#: Timeouts from here on (about 146 years) mean "no timeout": they would
#: overflow the nanosecond clock arithmetic.
MAX_TIMEOUT_NS = 1 << 62

#: The real-time signal that kicks a vCPU thread out of KVM_RUN.
KICK_SIGNAL = pvt_kick_signal()

SPACE_PIO = 0
SPACE_MMIO = 1
SPACE_MSR = 2

# Where each native device sits and how many ports it takes: the C headers'
# numbers (pyvt/includes/core.pxd), the only place pyvt gets them from.
UART_PORT = PVT_UART_DEFAULT_PORT
UART_PORT_COUNT = PVT_UART_PORT_COUNT
UART_IRQ = PVT_UART_DEFAULT_IRQ
UART_COM2_IRQ = PVT_UART_COM2_IRQ
DEBUGCON_PORT = PVT_DEBUGCON_DEFAULT_PORT
DEBUGCON_PORT_COUNT = PVT_DEBUGCON_PORT_COUNT
DEBUG_EXIT_PORT = PVT_DEBUG_EXIT_DEFAULT_PORT
DEBUG_EXIT_PORT_COUNT = PVT_DEBUG_EXIT_PORT_COUNT
GUEST_EXCEPTION_PORT = PVT_GUEST_EXCEPTION_PORT
FW_CFG_PORT = PVT_FW_CFG_PORT
FW_CFG_PORT_COUNT = PVT_FW_CFG_PORT_COUNT
CMOS_PORT = PVT_CMOS_PORT
CMOS_PORT_COUNT = PVT_CMOS_PORT_COUNT
PM_TIMER_PORT = PVT_PM_TIMER_PORT
PM_TIMER_PORT_COUNT = PVT_PM_TIMER_PORT_COUNT
I8042_DATA_PORT = PVT_I8042_DATA_PORT
I8042_COMMAND_PORT = PVT_I8042_COMMAND_PORT
I8042_PORT_COUNT = PVT_I8042_PORT_COUNT
POST_PORT = PVT_PORT80_PORT
POST_PORT_COUNT = PVT_PORT80_PORT_COUNT
PM1_PORT = PVT_PM1_PORT
PM1_PORT_COUNT = PVT_PM1_PORT_COUNT
PM1_EVENT_LENGTH = PVT_PM1_EVENT_LENGTH
PM1_CONTROL_LENGTH = PVT_PM1_CONTROL_LENGTH
PM1_SLP_TYP_S5 = PVT_PM1_SLP_TYP_S5
PM1_STOP_POWEROFF = PVT_PM1_STOP_POWEROFF
PM1_SLP_TYP_S3 = PVT_PM1_SLP_TYP_S3
PM1_STOP_SUSPEND = PVT_PM1_STOP_SUSPEND
PM1_STS_WAK = PVT_PM1_STS_WAK
PM1_STS_RTC = PVT_PM1_STS_RTC
PM1_EN_RTC = PVT_PM1_EN_RTC


# -- errors: the one place a native -errno becomes an exception ---------------

cdef int check_bus(int rc, str what) except -1:
    """Raises the error for a native I/O bus's -errno.  No ioctl was made,
    so never a KvmError; pyvt's own claim checks make these rare."""
    if rc == 0:
        return 0
    if rc == -errno.EEXIST:
        raise RegionOverlapError(f"{what}: the range overlaps one already on pyvt's bus")
    if rc == -errno.ENOENT:
        raise ArgumentError(f"{what}: nothing is registered at that address on pyvt's bus")
    if rc == -errno.EINVAL:
        raise ArgumentError(f"{what}: pyvt's bus cannot hold that range (empty or past 2**64)")
    raise DeviceError(f"{what} failed: {os.strerror(-rc)}")


cdef int check_device(int rc, str what, str hint="") except -1:
    """Raises DeviceError for a native device's -errno."""
    if rc == 0:
        return 0
    raise DeviceError(f"{what} failed: {os.strerror(-rc)}" + (f"; {hint}" if hint else ""))


cdef int check_state_size(bytes state, size_t size, str device) except -1:
    if <size_t>len(state) != size:
        raise DeviceStateError(f"a {device} state is {size} bytes, not {len(state)}: "
                               "it comes from another pyvt build")
    return 0


cdef str _hex(object value):
    return "?" if value is None else f"{value:#x}"


# Io, Mmio and Msr are pyvt.exits.Io / Mmio / Msr (re-exported there).  They
# live here, as C types, because one is built for every exit that reaches a
# Python handler.  Measured on the PVM development host: building a frozen
# dataclass per exit added about 4 us to a handler's round trip, though it
# costs 1 us in a micro-benchmark; a C type adds well under 1 us.

cdef class Io:
    """``KVM_EXIT_IO``: port I/O.

    ``data`` holds the bytes written (``direction == "out"``); for a read it
    is empty.  ``count`` > 1 is a string instruction (``rep outsb``...);
    handlers registered with ``vm.on_io`` see one element at a time.
    """

    cdef readonly int port
    cdef readonly int size
    cdef readonly str direction
    cdef readonly bytes data
    cdef readonly int count
    cdef readonly object rip

    failed = False
    error_class = None

    def __init__(self, int port, int size, str direction, bytes data=b"", int count=1,
                 rip=None):
        self.port = port
        self.size = size
        self.direction = direction
        self.data = data
        self.count = count
        self.rip = rip

    @property
    def is_write(self):
        return self.direction == "out"

    @property
    def value(self):
        """The first element written, as an integer (None for a read)."""
        if not self.data:
            return None
        return int.from_bytes(self.data[:self.size], "little")

    def _key(self):
        return (self.port, self.size, self.direction, self.data, self.count, self.rip)

    def __eq__(self, other):
        if type(other) is not Io:
            return NotImplemented
        return self._key() == (<Io>other)._key()

    def __hash__(self):
        return hash(("Io",) + self._key())

    def __reduce__(self):
        return (Io, self._key())

    def __repr__(self):
        value = "" if self.value is None else f", value={self.value:#x}"
        count = f", count={self.count}" if self.count != 1 else ""
        return (f"Io({self.direction} port={self.port:#x}, size={self.size}"
                f"{value}{count}, rip={_hex(self.rip)})")

    def describe(self):
        return repr(self)

    def raise_for_failure(self):
        return self


cdef class Mmio:
    """``KVM_EXIT_MMIO``: an access to a guest-physical address with no RAM
    (or a write to read-only memory)."""

    cdef readonly unsigned long long address
    cdef readonly int size
    cdef readonly bint is_write
    cdef readonly bytes data
    cdef readonly object rip

    failed = False
    error_class = None

    def __init__(self, unsigned long long address, int size, bint is_write,
                 bytes data=b"", rip=None):
        self.address = address
        self.size = size
        self.is_write = is_write
        self.data = data
        self.rip = rip

    @property
    def value(self):
        """The value written, as an integer (None for a read)."""
        if not self.data:
            return None
        return int.from_bytes(self.data[:self.size], "little")

    def _key(self):
        return (self.address, self.size, self.is_write, self.data, self.rip)

    def __eq__(self, other):
        if type(other) is not Mmio:
            return NotImplemented
        return self._key() == (<Mmio>other)._key()

    def __hash__(self):
        return hash(("Mmio",) + self._key())

    def __reduce__(self):
        return (Mmio, self._key())

    def __repr__(self):
        kind = "write" if self.is_write else "read"
        value = "" if self.value is None else f", value={self.value:#x}"
        return (f"Mmio({kind} address={self.address:#x}, size={self.size}"
                f"{value}, rip={_hex(self.rip)})")

    def describe(self):
        return repr(self)

    def raise_for_failure(self):
        return self


_MSR_REASONS = {KVM_MSR_EXIT_REASON_INVAL: "inval", KVM_MSR_EXIT_REASON_UNKNOWN: "unknown",
                KVM_MSR_EXIT_REASON_FILTER: "filter"}


cdef class Msr:
    """``KVM_EXIT_X86_RDMSR`` / ``KVM_EXIT_X86_WRMSR``: an ``rdmsr`` or
    ``wrmsr`` that KVM sent to user space (``KVM_CAP_X86_USER_SPACE_MSR``).

    ``index`` is the MSR (ECX); ``value`` the 64-bit value written
    (EDX:EAX; None for a read); ``reason`` why KVM sent it, one of
    ``REASON_FILTER`` (the MSR filter denied it: what ``vm.on_msr``
    arranges), ``REASON_UNKNOWN`` (KVM does not know the MSR) or
    ``REASON_INVAL`` (KVM refused the access).
    """

    REASON_INVAL = KVM_MSR_EXIT_REASON_INVAL
    REASON_UNKNOWN = KVM_MSR_EXIT_REASON_UNKNOWN
    REASON_FILTER = KVM_MSR_EXIT_REASON_FILTER

    cdef readonly unsigned int index
    cdef readonly bint is_write
    cdef readonly object value
    cdef readonly unsigned int reason
    cdef readonly object rip

    failed = False
    error_class = None

    def __init__(self, unsigned int index, bint is_write, value=None,
                 unsigned int reason=KVM_MSR_EXIT_REASON_FILTER, rip=None):
        self.index = index
        self.is_write = is_write
        self.value = value
        self.reason = reason
        self.rip = rip

    @property
    def direction(self):
        """``"rdmsr"`` or ``"wrmsr"``."""
        return "wrmsr" if self.is_write else "rdmsr"

    @property
    def size(self):
        """Bytes an answer to a read takes (``Vcpu.reply``): always 8."""
        return 8

    @property
    def reason_name(self):
        """``"filter"``, ``"unknown"`` or ``"inval"``."""
        return _MSR_REASONS.get(self.reason, f"{self.reason:#x}")

    def _key(self):
        return (self.index, self.is_write, self.value, self.reason, self.rip)

    def __eq__(self, other):
        if type(other) is not Msr:
            return NotImplemented
        return self._key() == (<Msr>other)._key()

    def __hash__(self):
        return hash(("Msr",) + self._key())

    def __reduce__(self):
        return (Msr, self._key())

    def __repr__(self):
        value = "" if self.value is None else f", value={self.value:#x}"
        return (f"Msr({self.direction} index={self.index:#x}{value}, "
                f"reason={self.reason_name}, rip={_hex(self.rip)})")

    def describe(self):
        return repr(self)

    def raise_for_failure(self):
        return self


cdef Io new_io(int port, int size, bint is_write, bytes data, object rip):
    cdef Io exit = Io.__new__(Io)
    exit.port = port
    exit.size = size
    exit.direction = "out" if is_write else "in"
    exit.data = data
    exit.count = 1
    exit.rip = rip
    return exit


cdef Mmio new_mmio(unsigned long long address, int size, bint is_write, bytes data,
                   object rip):
    cdef Mmio exit = Mmio.__new__(Mmio)
    exit.address = address
    exit.size = size
    exit.is_write = is_write
    exit.data = data
    exit.rip = rip
    return exit


cdef Msr new_msr(unsigned int index, bint is_write, object value, unsigned int reason,
                 object rip):
    cdef Msr exit = Msr.__new__(Msr)
    exit.index = index
    exit.is_write = is_write
    exit.value = value
    exit.reason = reason
    exit.rip = rip
    return exit


# A bus range carries its handler's id as a C int: ids run from 0 to this - 1.
HANDLER_ID_LIMIT = 0x7FFFFFFF


def _removed_handler(exit):
    """Stands in for a handler removed (``vm.off_io``/``off_mmio`` from
    another thread) after a vCPU had already exited to it: the access is
    answered as by a bus with nothing on it, reads all ones, writes dropped."""
    return None if exit.is_write else -1


cdef class Machine:
    """The native VM: I/O buses, registered handlers and devices."""

    cdef pvt_machine *m
    cdef readonly dict handlers  # user_id -> handler; see handler()
    cdef dict handler_ids  # (space, base) -> user_id of the handler there
    cdef long long next_handler_id
    cdef list devices

    def __cinit__(self):
        self.m = <pvt_machine *>calloc(1, sizeof(pvt_machine))
        if self.m == NULL:
            raise MemoryError()
        rc = pvt_machine_init(self.m)
        if rc:
            free(self.m)
            self.m = NULL
            raise Error(f"cannot set up the native machine: {os.strerror(-rc)}")
        self.handlers = {}
        self.handler_ids = {}
        self.devices = []

    def __dealloc__(self):
        if self.m != NULL:
            pvt_machine_destroy(self.m)
            free(self.m)

    def __init__(self):
        pass

    cdef object handler(self, int user_id):
        """The handler for user_id; a missing id is a handler removed while
        a vCPU was on its way to it (see _removed_handler): never a
        KeyError in run()."""
        handler = self.handlers.get(user_id)
        return _removed_handler if handler is None else handler

    cdef pvt_bus *bus(self, int space):
        if space == SPACE_PIO:
            return &self.m.pio
        return &self.m.mmio if space == SPACE_MMIO else &self.m.msr

    cdef int new_handler_id(self) except -1:
        # Ids count up, wrapping only after 2**31 registrations and skipping
        # live ones: a vCPU that exited to a handler removed meanwhile finds
        # no handler under its id (_removed_handler), never a newer one.
        user_id = self.next_handler_id
        while user_id in self.handlers:
            user_id = (user_id + 1) % HANDLER_ID_LIMIT
        self.next_handler_id = (user_id + 1) % HANDLER_ID_LIMIT
        return user_id

    def add_handler(self, int space, uint64_t base, uint64_t length, handler):
        """Claims a range for a Python handler (raises if the bus refuses)."""
        user_id = self.new_handler_id()
        # In the table before the range exists: a vCPU may exit to it at once.
        self.handlers[user_id] = handler
        rc = pvt_bus_register(self.bus(space), base, length, NULL, NULL, user_id)
        if rc:
            del self.handlers[user_id]
            check_bus(rc, f"registering a handler at {base:#x}")
        self.handler_ids[(space, base)] = user_id

    def remove(self, int space, uint64_t base):
        """Releases the handler range starting at base and drops the
        reference to its handler."""
        check_bus(pvt_bus_unregister(self.bus(space), base),
                  f"removing the handler at {base:#x}")
        user_id = self.handler_ids.pop((space, base), None)
        if user_id is not None:
            del self.handlers[user_id]

    @property
    def unclaimed_as_pc(self):
        return bool(self.m.unclaimed_as_pc)

    @unclaimed_as_pc.setter
    def unclaimed_as_pc(self, value):
        self.m.unclaimed_as_pc = bool(value)

    def close(self):
        """Drops the references to handlers and devices (cycles)."""
        self.handlers = {}
        self.handler_ids = {}
        self.devices = []


#: Bytes of output a console keeps unless told otherwise (sink.h).
DEFAULT_OUTPUT_LIMIT = PVT_SINK_DEFAULT_LIMIT


cdef bytes sink_bytes(pvt_sink *sink):
    cdef size_t size = pvt_sink_copy(sink, 0, NULL, 0)
    cdef size_t total
    cdef bytes out
    while True:
        out = PyBytes_FromStringAndSize(NULL, size)
        total = pvt_sink_copy(sink, 0, <uint8_t *>PyBytes_AS_STRING(out), size)
        if total == size:
            return out
        size = total  # a vCPU thread wrote or a clear() came in between: again


cdef enum:
    _MAX_RANGES = 4  # bus ranges one device may hold (the i8042 has 2)


cdef class _Device:
    """A native device on one or more ranges of the machine's buses, each
    with its own C entry point (the i8042's data and command ports are two
    ranges).  attach() puts every range on the bus or none; detach() takes
    every range off.  ``ranges`` lists them as (space, start, length)."""

    cdef Machine machine
    cdef int nranges
    cdef int spaces[_MAX_RANGES]
    cdef uint64_t starts[_MAX_RANGES]
    cdef uint64_t lengths[_MAX_RANGES]
    cdef pvt_io_fn fns[_MAX_RANGES]
    cdef void *opaques[_MAX_RANGES]
    cdef readonly bint attached
    # Set by coalesce_lazily(): wraps the first range's entry point.
    cdef pvt_lazy_coalesce *lazy

    def __dealloc__(self):
        if self.lazy != NULL:
            pvt_lazy_coalesce_destroy(self.lazy)
            free(self.lazy)

    cdef void add_range(self, uint64_t start, uint64_t length, pvt_io_fn fn,
                        void *opaque, int space=SPACE_PIO) noexcept:
        # Only the constructors below call this, at most _MAX_RANGES times.
        self.spaces[self.nranges] = space
        self.starts[self.nranges] = start
        self.lengths[self.nranges] = length
        self.fns[self.nranges] = fn
        self.opaques[self.nranges] = opaque
        self.nranges += 1

    @property
    def base(self):
        """Where the first range starts (the device's port)."""
        return self.starts[0]

    @property
    def ranges(self):
        """((space, start, length), ...), one per bus range."""
        return tuple((self.spaces[i], self.starts[i], self.lengths[i])
                     for i in range(self.nranges))

    cdef str where(self, int i):
        return f"{type(self).__name__} at {self.starts[i]:#x}"

    def coalesce_lazily(self, int vm_fd):
        """Makes KVM queue the guest's writes to the first port (a console's
        data register) in the coalesced ring, from the guest's first write
        to it on (csrc/lazy_coalesce.h says why not at once).  Before
        attach(), once."""
        if self.attached or self.lazy != NULL:
            raise DeviceError(f"{self.where(0)}: coalesce_lazily() comes once, before attach()")
        self.lazy = <pvt_lazy_coalesce *>calloc(1, sizeof(pvt_lazy_coalesce))
        if self.lazy == NULL:
            raise MemoryError()
        pvt_lazy_coalesce_init(self.lazy, vm_fd, self.starts[0], self.fns[0], self.opaques[0])
        self.fns[0] = pvt_lazy_coalesce_io
        self.opaques[0] = self.lazy

    @property
    def coalescing(self):
        """"armed" (from the next write on), "registered" (KVM queues the
        writes) or None (not coalesced)."""
        if self.lazy == NULL:
            return None
        state = pvt_lazy_coalesce_state(self.lazy)
        if state == PVT_COALESCE_ARMED:
            return "armed"
        return "registered" if state == PVT_COALESCE_REGISTERED else None

    def stop_coalescing(self):
        """No more coalescing; unregisters the zone if the guest's writes
        had registered it (replay the ring first: Vm._sync_devices)."""
        if self.lazy != NULL:
            rc = pvt_lazy_coalesce_disable(self.lazy)
            if rc:
                raise KvmError("KVM_UNREGISTER_COALESCED_MMIO", -rc,
                               f"{self.where(0)} stays coalesced")

    def attach(self):
        """Puts every range on the bus (all or none)."""
        cdef int i, j, rc
        if self.attached:
            return
        for i in range(self.nranges):
            rc = pvt_bus_register(self.machine.bus(self.spaces[i]), self.starts[i],
                                  self.lengths[i], self.fns[i], self.opaques[i], PVT_NO_USER)
            if rc:
                for j in range(i):  # registered just now: they are there to remove
                    check_bus(pvt_bus_unregister(self.machine.bus(self.spaces[j]),
                                                 self.starts[j]), f"undoing {self.where(j)}")
                check_bus(rc, f"attaching {self.where(i)}")
        self.attached = True
        self.machine.devices.append(self)

    def detach(self):
        """Takes every range off the bus."""
        cdef int i, rc, failed = -1, first = 0
        if not self.attached:
            return
        for i in range(self.nranges):  # all of them, even after a failure
            rc = pvt_bus_unregister(self.machine.bus(self.spaces[i]), self.starts[i])
            if rc and failed < 0:
                failed, first = i, rc
        self.attached = False
        if failed >= 0:
            check_bus(first, f"detaching {self.where(failed)}")


cdef class _CharDevice(_Device):
    """A native device whose guest output goes to a sink (sink.h)."""

    cdef pvt_sink *sink

    def output(self):
        """The kept output: the last ``limit`` bytes the guest wrote."""
        return sink_bytes(self.sink)

    def clear(self):
        pvt_sink_clear(self.sink)

    def stream(self, int fd):
        """Streams to a duplicate of ``fd`` (-1: stop)."""
        rc = pvt_sink_set_stream(self.sink, fd)
        if rc == -errno.EBADF:
            raise ArgumentError(f"cannot stream to fd {fd}: it is not open")
        check_device(rc, f"duplicating fd {fd} for the stream (F_DUPFD_CLOEXEC)",
                     "close some files")

    @property
    def limit(self):
        """Most bytes of output kept, or None for no limit."""
        return None if self.sink.limit == PVT_SINK_UNLIMITED else self.sink.limit

    def set_limit(self, limit):
        """Keeps at most ``limit`` bytes (None: all)."""
        cdef size_t value = PVT_SINK_UNLIMITED if limit is None else limit
        check_device(pvt_sink_set_limit(self.sink, value), f"keeping {limit} bytes of output")

    @property
    def dropped(self):
        """Bytes written since the last clear() that the limit dropped."""
        return pvt_sink_dropped(self.sink)

    def replace_output(self, bytes data):
        check_device(pvt_sink_replace(self.sink, <const uint8_t *>PyBytes_AS_STRING(data),
                                      len(data)), "replacing the output")


cdef class Uart(_CharDevice):
    """A native 16550A UART (the serial console)."""

    cdef pvt_uart *uart
    cdef object irq_gsi
    STATE_SIZE = sizeof(pvt_uart_state)

    def __cinit__(self):
        self.uart = <pvt_uart *>calloc(1, sizeof(pvt_uart))
        if self.uart == NULL:
            raise MemoryError()
        if pvt_uart_init(self.uart):
            free(self.uart)
            self.uart = NULL
            raise MemoryError()
        self.sink = &self.uart.output

    def __dealloc__(self):
        if self.uart != NULL:
            pvt_uart_destroy(self.uart)
            free(self.uart)

    def __init__(self, Machine machine, uint64_t base):
        self.machine = machine
        self.add_range(base, PVT_UART_PORT_COUNT, pvt_uart_io, self.uart)

    def feed(self, const uint8_t[:] data):
        if data.shape[0] == 0:
            return 0
        cdef uint32_t fed, n = <uint32_t>data.shape[0]
        with nogil:  # may drive the IRQ line (KVM_IRQ_LINE)
            fed = pvt_uart_feed(self.uart, &data[0], n)
        return fed

    def connect_irq(self, int vm_fd, gsi):
        """Drives ISA line ``gsi`` of the VM ``vm_fd`` with KVM_IRQ_LINE
        (``vm_fd`` -1: no line; none is driven after this returns)."""
        cdef uint32_t line = 0 if vm_fd < 0 else gsi
        with nogil:
            pvt_uart_connect_irq(self.uart, vm_fd, line)
        self.irq_gsi = None if vm_fd < 0 else gsi

    @property
    def irq(self):
        """The ISA line the UART drives, or None."""
        return self.irq_gsi

    @property
    def irq_level(self):
        """The level the UART drives its line to: 1 while an enabled
        interrupt is pending and MCR.OUT2 is set."""
        return pvt_uart_irq_level(self.uart)

    def save_state(self):
        """Registers, pending interrupts, line level and receive FIFO as
        bytes (struct pvt_uart_state)."""
        cdef bytes out = PyBytes_FromStringAndSize(NULL, sizeof(pvt_uart_state))
        pvt_uart_save(self.uart, <pvt_uart_state *>PyBytes_AS_STRING(out))
        return out

    def load_state(self, bytes state, bint irqchip=True):
        """Puts back what save_state returned, driving the IRQ line to its
        level; ``irqchip=False`` (the VM has no in-kernel irqchip) skips
        that KVM_IRQ_LINE, which could only fail."""
        cdef int rc
        cdef const pvt_uart_state *loaded
        check_state_size(state, sizeof(pvt_uart_state), "UART")
        loaded = <const pvt_uart_state *>PyBytes_AS_STRING(state)
        with nogil:  # drives the IRQ line to the state's level
            rc = pvt_uart_load_state(self.uart, loaded, irqchip)
        if rc == -errno.EOVERFLOW:
            raise DeviceStateError("the UART state holds more input than its receive FIFO")
        if rc:
            raise DeviceStateError("the UART state is inconsistent: a register holds bits a "
                                   "16550 does not have, or the IRQ line level is not the one "
                                   "its registers give (take the snapshot again)")


cdef class DebugCon(_CharDevice):
    """QEMU's debug console port: bytes written are output."""

    def __cinit__(self):
        self.sink = <pvt_sink *>calloc(1, sizeof(pvt_sink))
        if self.sink == NULL:
            raise MemoryError()
        if pvt_sink_init(self.sink):
            free(self.sink)
            self.sink = NULL
            raise MemoryError()

    def __dealloc__(self):
        if self.sink != NULL:
            pvt_sink_destroy(self.sink)
            free(self.sink)

    def __init__(self, Machine machine, uint64_t base):
        self.machine = machine
        self.add_range(base, PVT_DEBUGCON_PORT_COUNT, pvt_debugcon_io, self.sink)

    def feed(self, data):
        raise ArgumentTypeError("the debug console has no input")


cdef class DebugExit(_Device):
    """QEMU's isa-debug-exit: a write stops the run with the value."""

    def __init__(self, Machine machine, uint64_t base):
        self.machine = machine
        self.add_range(base, PVT_DEBUG_EXIT_PORT_COUNT, pvt_debug_exit_io, NULL)


cpdef bytes read_answer(object value, uint32_t size, str space, unsigned long long where):
    """The bytes an answer to a ``size``-byte read puts in the guest: an int
    from 0 to 2**(8*size) - 1, a negative int that fits ``size`` bytes as a
    signed value (sent in two's complement: -1 is all ones), or exactly
    ``size`` bytes.  Used for handlers' return values and for Vcpu.reply();
    ``space`` and ``where`` only name the access in the error: an
    ArgumentTypeError for a wrong type, else an ArgumentError."""
    cdef object bits = 8 * size  # a Python int: 1 << 64 must not wrap in C
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            if value >= 0:  # the usual answer: no keyword call on the hot path
                return value.to_bytes(size, "little")
            return value.to_bytes(size, "little", signed=True)
        except OverflowError:
            raise ArgumentError(
                f"{space} {where:#x}: {value:#x} does not fit in a {size}-byte read; answer "
                f"0 to {(1 << bits) - 1:#x}, -{1 << (bits - 1):#x} to -1 (sent in two's "
                f"complement) or {size} bytes") from None
    if isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
        if len(raw) != size:
            raise ArgumentError(f"{space} {where:#x}: got {len(raw)} bytes for a {size}-byte "
                                f"read; answer exactly {size} bytes or an int")
        return raw
    raise ArgumentTypeError(f"{space} {where:#x}: a {size}-byte read needs an int (or {size} "
                            f"bytes) as its answer, not {reprlib.repr(value)}")


cdef class VcpuLoop:
    """Runs one vCPU through the native run loop."""

    cdef pvt_vcpu v
    cdef pvt_stop_info info
    cdef Machine machine
    cdef volatile bint stop_requested
    # Called (no arguments) when KVM_RUN stops because this vCPU's dirty
    # ring is full: it harvests and resets the rings, and the run goes on.
    cdef public object on_dirty_ring_full
    cdef uint64_t dirty_ring_full_exits
    # Exits served by a Python handler (vm.on_io / on_mmio / on_msr).
    cdef uint64_t python_exits
    # Holds a buffer export of the vCPU's mmap: while the loop lives, the
    # kvm_run page cannot be unmapped under it (mmap.close() refuses).
    cdef uint8_t[::1] page

    def __init__(self, Machine machine, int fd, run_page, Py_ssize_t ring_offset,
                 long page_size):
        self.machine = machine
        self.page = run_page
        if ring_offset and ring_offset + page_size > self.page.shape[0]:
            raise ArgumentError("the coalesced ring lies outside the vCPU mapping")
        pvt_vcpu_init(&self.v, fd, <kvm_run *>&self.page[0], self.page.shape[0], machine.m,
                      <void *>&self.page[ring_offset] if ring_offset else NULL,
                      page_size)

    def __dealloc__(self):
        pvt_vcpu_destroy(&self.v)

    def close(self):
        pvt_vcpu_destroy(&self.v)
        self.page = None

    def request_stop(self):
        """Asks a running loop to return STOP_REQUESTED at its next safe
        point.  The caller must also kick the running thread (KICK_SIGNAL)."""
        self.stop_requested = True
        if self.v.run != NULL:
            self.v.run.immediate_exit = 1

    def clear_stop(self):
        """Drops a stop request that came too late for the run it aimed at."""
        self.stop_requested = False
        if self.v.run != NULL:
            self.v.run.immediate_exit = 0

    @property
    def pending_io(self):
        """"read" or "write" while the last exit's access waits for the next
        KVM_RUN to complete it (see csrc/io_completion.h), else None."""
        if self.v.run == NULL or self.v.pending_io == PVT_PENDING_NONE:
            return None
        return "read" if self.v.pending_io == PVT_PENDING_READ else "write"

    def finish_io(self, str vcpu):
        """Completes the pending access now, with what kvm_run holds
        (``vcpu`` names the vCPU in an error)."""
        if self.v.run != NULL:
            self.check_settled(pvt_vcpu_finish_io(&self.v), vcpu, "complete")

    def abandon_io(self, str vcpu):
        """Drops a pending read (the instruction runs again on the next
        run) or retires a pending write."""
        if self.v.run != NULL:
            self.check_settled(pvt_vcpu_abandon_io(&self.v), vcpu, "abandon")

    cdef int check_settled(self, int rc, str vcpu, str what) except -1:
        if rc == -errno.EPROTO:  # KVM_RUN exited instead of just completing
            raise Error(f"{vcpu}: KVM reported exit reason {self.v.run.exit_reason} while "
                        f"pyvt tried to {what} the pending I/O access; run() the vCPU to see it")
        if rc:
            raise KvmError("KVM_RUN", -rc, f"{vcpu} could not {what} its pending I/O access")
        return 0

    @property
    def stats(self):
        """Counters: KVM_RUN returns, exits handled natively, exits handled
        by Python handlers, coalesced writes, full dirty rings harvested on
        the way."""
        return {"kvm_exits": self.v.kvm_exits,
                "native_exits": self.v.native_exits,
                "python_exits": self.python_exits,
                "coalesced_writes": self.v.coalesced,
                "dirty_ring_full_exits": self.dirty_ring_full_exits}

    @property
    def exits_by_reason(self):
        """Returns from KVM_RUN by exit reason: a list of EXIT_REASON_SLOTS
        counts indexed by ``kvm_run.exit_reason`` (an EINTR counts as
        KVM_EXIT_INTR; the last slot holds every reason at or above it)."""
        return [self.v.exits_by_reason[i] for i in range(PVT_EXIT_REASON_SLOTS)]

    @property
    def guest_ns(self):
        """Nanoseconds (CLOCK_MONOTONIC) the loop spent inside KVM_RUN."""
        return self.v.guest_ns

    def io_data_valid(self):
        """The run loop's check that an I/O exit's data lies in the mapping."""
        return self.v.run != NULL and pvt_vcpu_io_data_valid(&self.v)

    def drain(self):
        """Replays pending coalesced writes to their devices."""
        if self.v.run != NULL:
            pvt_vcpu_drain_coalesced(&self.v)

    cdef object rip(self):
        cdef kvm_regs regs
        if self.v.run.kvm_valid_regs & KVM_SYNC_X86_REGS:
            return self.v.run.s.regs.regs.rip
        # A backend without KVM_CAP_SYNC_REGS (pyvt.ko): ask, one ioctl.
        if ioctl(self.v.fd, KVM_GET_REGS, &regs) == 0:
            return regs.rip
        return None

    cdef int call_io(self, int user_id) except -1:
        cdef kvm_run *run = self.v.run
        cdef uint8_t *data = <uint8_t *>run + run.io.data_offset
        cdef uint32_t size = run.io.size
        cdef uint32_t count = run.io.count
        cdef uint32_t i
        cdef bint is_write = run.io.direction == KVM_EXIT_IO_OUT
        cdef int port = run.io.port
        handler = self.machine.handler(user_id)
        rip = self.rip()
        # A read gets its data from each answer; if a handler raises instead,
        # call_handler abandons the read, so no stale data reaches the guest.
        for i in range(count):
            element = data + i * size
            if is_write:
                handler(new_io(port, size, True, element[:size], rip))
            else:
                answer = read_answer(handler(new_io(port, size, False, b"", rip)),
                                     size, "port", port)
                memcpy(element, PyBytes_AS_STRING(answer), size)
        return 0

    cdef int call_mmio(self, int user_id) except -1:
        cdef kvm_run *run = self.v.run
        cdef uint32_t size = run.mmio.len
        handler = self.machine.handler(user_id)
        if run.mmio.is_write:
            handler(new_mmio(run.mmio.phys_addr, size, True, run.mmio.data[:size],
                             self.rip()))
        else:
            answer = read_answer(
                handler(new_mmio(run.mmio.phys_addr, size, False, b"", self.rip())),
                size, "MMIO", run.mmio.phys_addr)
            memcpy(run.mmio.data, PyBytes_AS_STRING(answer), size)
        return 0

    cdef int call_msr(self, int user_id) except -1:
        cdef kvm_run *run = self.v.run
        cdef bint is_write = run.exit_reason == KVM_EXIT_X86_WRMSR
        handler = self.machine.handler(user_id)
        exit = new_msr(run.msr.index, is_write, run.msr.data if is_write else None,
                       run.msr.reason, self.rip())
        try:
            answer = handler(exit)
        except MsrFault:
            run.msr.error = 1  # the next KVM_RUN injects #GP
            return 0
        if not is_write:
            run.msr.data = int.from_bytes(read_answer(answer, 8, "MSR", exit.index), "little")
        return 0

    cdef int call_handler(self, int stop) except -1:
        """Runs the Python handler of a USER_IO/USER_MMIO/USER_MSR stop.
        The kick never reaches it (csrc/kick.h); if the handler raises, its
        read is abandoned (the instruction runs again next time) or its
        write retired (csrc/io_completion.h)."""
        self.python_exits += 1
        self.hold_kick()
        try:
            if stop == PVT_STOP_USER_IO:
                self.call_io(self.info.user_id)
            elif stop == PVT_STOP_USER_MMIO:
                self.call_mmio(self.info.user_id)
            else:
                self.call_msr(self.info.user_id)
        except BaseException:
            # The handler's exception is what the caller must see; should
            # abandoning fail too, the next run() reports KVM's state.
            pvt_vcpu_abandon_io(&self.v)
            raise
        finally:
            self.release_kick()
        return 0

    cdef int call_dirty_ring_full(self) except -1:
        """KVM_EXIT_DIRTY_RING_FULL: the callback empties the rings (the
        next KVM_RUN goes on where the guest was); if it raises, the run
        stops with its exception."""
        self.dirty_ring_full_exits += 1
        self.hold_kick()
        try:
            self.on_dirty_ring_full()
        finally:
            self.release_kick()
        return 0

    cdef int check_signals(self) except -1:
        """Runs Python's signal handlers (Ctrl-C), out of the kick's way."""
        self.hold_kick()
        try:
            PyErr_CheckSignals()
        finally:
            self.release_kick()
        return 0

    cdef inline void hold_kick(self) noexcept:
        if not self.v.kick_masked:  # else it is blocked outside KVM_RUN anyway
            pvt_kick_hold()

    cdef inline void release_kick(self) noexcept:
        if not self.v.kick_masked:
            pvt_kick_release()

    def run(self, double timeout=-1.0, double tick=0.0):
        """Runs until the caller is needed.

        Returns ``(stop, code, port)``: stop is STOP_EXIT (decode kvm_run),
        STOP_DEVICE (a native device stopped: code is its value, port where),
        STOP_TIMEOUT, or STOP_ERROR (code is the errno of KVM_RUN).
        timeout < 0 (or one too far away to count in nanoseconds) means
        none; tick > 0 kicks every tick seconds so that Ctrl-C is seen even
        while the guest spins.
        """
        cdef int rc
        cdef uint64_t deadline = 0
        cdef uint64_t first = 0
        cdef uint64_t interval = <uint64_t>(tick * 1e9) if tick > 0 else 0
        cdef uint64_t timeout_ns
        cdef bint armed = False

        if self.v.run == NULL:
            raise ClosedError("the vCPU is closed")
        rc = pvt_kick_setup()
        if rc:
            raise Error(f"cannot install the vCPU kick signal handler: {os.strerror(-rc)}")
        if timeout >= MAX_TIMEOUT_NS / 1e9:
            timeout = -1.0  # centuries: no deadline (and no uint64 overflow)
        if timeout >= 0:
            timeout_ns = <uint64_t>(timeout * 1e9)
            deadline = pvt_now_ns() + timeout_ns
            first = timeout_ns if interval == 0 or timeout_ns < interval else interval
        elif interval:
            first = interval

        pvt_kick_block_outside_run(self.v.kick_masked)
        pvt_kick_set_current(self.v.run)
        try:
            if first:
                rc = pvt_kick_arm(first, interval)
                if rc:
                    raise Error(f"cannot arm the vCPU kick timer: {os.strerror(-rc)}")
                armed = True
            elif timeout >= 0:
                # A zero timeout: run no guest code at all.
                return (STOP_TIMEOUT, 0, 0)
            while True:
                memset(&self.info, 0, sizeof(self.info))
                with nogil:
                    rc = pvt_vcpu_run(&self.v, &self.info)
                if rc == PVT_STOP_USER_IO or rc == PVT_STOP_USER_MMIO or rc == PVT_STOP_USER_MSR:
                    self.call_handler(rc)
                elif rc == PVT_STOP_INTERRUPTED:
                    self.check_signals()
                    if self.stop_requested:
                        self.stop_requested = False
                        return (STOP_REQUESTED, 0, 0)
                    if deadline and pvt_now_ns() >= deadline:
                        return (STOP_TIMEOUT, 0, 0)
                elif rc < 0:
                    return (STOP_ERROR, -rc, 0)
                elif (rc == PVT_STOP_EXIT and self.on_dirty_ring_full is not None
                      and self.v.run.exit_reason == KVM_EXIT_DIRTY_RING_FULL):
                    self.call_dirty_ring_full()
                else:
                    return (rc, self.info.stop_code, self.info.device_port)
        finally:
            if armed:
                pvt_kick_disarm()
            pvt_kick_set_current(NULL)
            self.v.run.immediate_exit = 0


# -- PC platform devices (csrc/fw_cfg.c, cmos.c, pm_timer.c, i8042.c, port80.c)

FW_CFG_SIGNATURE = PVT_FW_CFG_SIGNATURE
FW_CFG_ID = PVT_FW_CFG_ID
FW_CFG_RAM_SIZE = PVT_FW_CFG_RAM_SIZE
FW_CFG_NB_CPUS = PVT_FW_CFG_NB_CPUS
FW_CFG_MAX_CPUS = PVT_FW_CFG_MAX_CPUS
FW_CFG_FILE_DIR = PVT_FW_CFG_FILE_DIR
FW_CFG_FILE_FIRST = PVT_FW_CFG_FILE_FIRST
FW_CFG_KEY_COUNT = PVT_FW_CFG_KEY_COUNT
FW_CFG_NAME_SIZE = PVT_FW_CFG_NAME_SIZE
CMOS_SIZE = PVT_CMOS_SIZE
PM_TIMER_HZ = PVT_PM_TIMER_HZ
I8042_CMD_PULSE_RESET = PVT_I8042_CMD_PULSE_RESET
I8042_STOP_RESET = PVT_I8042_STOP_RESET


cdef class FwCfg(_Device):
    """QEMU's fw_cfg (selector/data ports)."""

    cdef pvt_fw_cfg *fw

    def __cinit__(self):
        self.fw = <pvt_fw_cfg *>calloc(1, sizeof(pvt_fw_cfg))
        if self.fw == NULL:
            raise MemoryError()
        if pvt_fw_cfg_init(self.fw):
            free(self.fw)
            self.fw = NULL
            raise MemoryError()

    def __dealloc__(self):
        if self.fw != NULL:
            pvt_fw_cfg_destroy(self.fw)
            free(self.fw)

    def __init__(self, Machine machine, uint64_t base):
        self.machine = machine
        self.add_range(base, PVT_FW_CFG_PORT_COUNT, pvt_fw_cfg_io, self.fw)

    def set(self, uint16_t key, const uint8_t[:] data):
        cdef uint32_t n = <uint32_t>data.shape[0]
        check_device(pvt_fw_cfg_set(self.fw, key, &data[0] if n else NULL, n),
                     f"setting fw_cfg item {key:#x}")

    def set_u16(self, uint16_t key, uint16_t value):
        check_device(pvt_fw_cfg_set_u16(self.fw, key, value), f"setting fw_cfg item {key:#x}")

    def set_u64(self, uint16_t key, uint64_t value):
        check_device(pvt_fw_cfg_set_u64(self.fw, key, value), f"setting fw_cfg item {key:#x}")

    def add_file(self, bytes name, const uint8_t[:] data):
        """Adds (or replaces) the file ``name``; returns its key."""
        cdef uint32_t n = <uint32_t>data.shape[0]
        rc = pvt_fw_cfg_add_file(self.fw, name, &data[0] if n else NULL, n)
        if rc == -errno.ENOSPC:
            raise DeviceError(f"cannot add fw_cfg file {name!r}: no fw_cfg key is left")
        if rc < 0:
            check_device(rc, f"adding fw_cfg file {name!r}")
        return rc

    def position(self):
        """(selected key, offset in it): where the guest's next read goes."""
        cdef uint16_t selector = 0
        cdef uint32_t offset = 0
        pvt_fw_cfg_get_position(self.fw, &selector, &offset)
        return (selector, offset)

    def set_position(self, uint16_t selector, uint32_t offset):
        pvt_fw_cfg_set_position(self.fw, selector, offset)

    def get(self, uint16_t key):
        """The item's bytes, or None if there is no such key."""
        cdef long long n = pvt_fw_cfg_get(self.fw, key, NULL, 0)
        if n < 0:
            return None
        out = PyBytes_FromStringAndSize(NULL, n)
        pvt_fw_cfg_get(self.fw, key, <uint8_t *>PyBytes_AS_STRING(out), <uint32_t>n)
        return out


cdef class Cmos(_Device):
    """CMOS RAM and RTC (index/data ports)."""

    cdef pvt_cmos *cmos
    STATE_SIZE = sizeof(pvt_cmos_state)

    def __cinit__(self):
        self.cmos = <pvt_cmos *>calloc(1, sizeof(pvt_cmos))
        if self.cmos == NULL:
            raise MemoryError()
        if pvt_cmos_init(self.cmos):
            free(self.cmos)
            self.cmos = NULL
            raise MemoryError()

    def __dealloc__(self):
        if self.cmos != NULL:
            pvt_cmos_destroy(self.cmos)
            free(self.cmos)

    def __init__(self, Machine machine, uint64_t base):
        self.machine = machine
        self.add_range(base, PVT_CMOS_PORT_COUNT, pvt_cmos_io, self.cmos)

    def set_memory(self, uint64_t below_4g, uint64_t above_4g):
        pvt_cmos_set_memory(self.cmos, below_4g, above_4g)

    def read(self, uint8_t index):
        return pvt_cmos_read(self.cmos, index)

    def write(self, uint8_t index, uint8_t value):
        pvt_cmos_write(self.cmos, index, value)

    def save_state(self):
        """Index, RAM and clock offset as bytes (struct pvt_cmos_state)."""
        cdef bytes out = PyBytes_FromStringAndSize(NULL, sizeof(pvt_cmos_state))
        pvt_cmos_save(self.cmos, <pvt_cmos_state *>PyBytes_AS_STRING(out))
        return out

    def load_state(self, bytes state):
        check_state_size(state, sizeof(pvt_cmos_state), "CMOS")
        pvt_cmos_load(self.cmos, <const pvt_cmos_state *>PyBytes_AS_STRING(state))


cdef class PmTimer(_Device):
    """The ACPI PM timer (one 32-bit port)."""

    cdef pvt_pm_timer timer

    def __init__(self, Machine machine, uint64_t base):
        self.machine = machine
        self.add_range(base, PVT_PM_TIMER_PORT_COUNT, pvt_pm_timer_io, &self.timer)
        rc = pvt_pm_timer_init(&self.timer)
        if rc:
            raise DeviceError(f"the PM timer cannot read CLOCK_MONOTONIC: {os.strerror(-rc)}")

    def value(self):
        return pvt_pm_timer_value(&self.timer)


cdef class I8042(_Device):
    """The keyboard controller: two ranges, the data port at ``base`` and
    the command/status port (PVT_I8042_COMMAND_PORT - PVT_I8042_DATA_PORT
    above it), each with its own entry point into csrc/i8042.c."""

    cdef pvt_i8042 *kbc
    STATE_SIZE = sizeof(pvt_i8042_state)

    def __cinit__(self):
        self.kbc = <pvt_i8042 *>calloc(1, sizeof(pvt_i8042))
        if self.kbc == NULL:
            raise MemoryError()
        if pvt_i8042_init(self.kbc):
            free(self.kbc)
            self.kbc = NULL
            raise MemoryError()

    def __dealloc__(self):
        if self.kbc != NULL:
            pvt_i8042_destroy(self.kbc)
            free(self.kbc)

    def __init__(self, Machine machine, uint64_t base):
        self.machine = machine
        self.add_range(base, PVT_I8042_PORT_COUNT, pvt_i8042_data_io, self.kbc)
        self.add_range(base + PVT_I8042_COMMAND_PORT - PVT_I8042_DATA_PORT,
                       PVT_I8042_PORT_COUNT, pvt_i8042_command_io, self.kbc)

    @property
    def command_byte(self):
        return self.kbc.command_byte

    def save_state(self):
        """Every register as bytes (struct pvt_i8042_state)."""
        cdef bytes out = PyBytes_FromStringAndSize(NULL, sizeof(pvt_i8042_state))
        pvt_i8042_save(self.kbc, <pvt_i8042_state *>PyBytes_AS_STRING(out))
        return out

    def load_state(self, bytes state):
        check_state_size(state, sizeof(pvt_i8042_state), "i8042")
        pvt_i8042_load(self.kbc, <const pvt_i8042_state *>PyBytes_AS_STRING(state))


cdef class PostCode(_Device):
    """Port 0x80, the POST-code port: absorbs writes, reads back the last one."""

    cdef pvt_port80 post
    STATE_SIZE = 9  # the last code (u8), the write count (u64, little-endian)

    def __init__(self, Machine machine, uint64_t base):
        self.machine = machine
        self.add_range(base, PVT_PORT80_PORT_COUNT, pvt_port80_io, &self.post)

    @property
    def last(self):
        return self.post.last

    @property
    def writes(self):
        return self.post.writes

    def save_state(self):
        return bytes([self.post.last]) + int(self.post.writes).to_bytes(8, "little")

    def load_state(self, bytes state):
        check_state_size(state, PostCode.STATE_SIZE, "POST-code")
        self.post.last = state[0]
        self.post.writes = int.from_bytes(state[1:], "little")


cdef class AcpiPm1(_Device):
    """The ACPI PM1a event and control blocks (csrc/acpi_pm1.c): sleeping
    in S5 stops the run with PVT_PM1_STOP_POWEROFF, in S3 with
    PVT_PM1_STOP_SUSPEND."""

    cdef pvt_acpi_pm1 pm
    STATE_SIZE = 6  # PM1_STS, PM1_EN, PM1_CNT (u16 each, little-endian)

    def __init__(self, Machine machine, uint64_t base):
        self.machine = machine
        self.add_range(base, PVT_PM1_PORT_COUNT, pvt_acpi_pm1_io, &self.pm)

    @property
    def status(self):
        return self.pm.status

    @property
    def enable(self):
        return self.pm.enable

    @property
    def control(self):
        return self.pm.control

    def save_state(self):
        return b"".join(int(v).to_bytes(2, "little")
                        for v in (self.pm.status, self.pm.enable, self.pm.control))

    def load_state(self, bytes state):
        check_state_size(state, AcpiPm1.STATE_SIZE, "ACPI PM1")
        self.pm.status = int.from_bytes(state[0:2], "little")
        self.pm.enable = int.from_bytes(state[2:4], "little")
        self.pm.control = int.from_bytes(state[4:6], "little")


# -- the dirty ring (csrc/dirty_ring.c) ------------------------------------------

cdef enum:
    # Entries harvested per call into C: the batch buffers stay small.
    _DIRTY_RING_BATCH = 256


cdef uint32_t[:] _ring_window(ring, uint32_t entries) except *:
    """``ring`` (a writable buffer of ``entries`` struct kvm_dirty_gfn) as
    32-bit words, checked."""
    if entries == 0 or entries & (entries - 1):
        raise ArgumentError(f"a dirty ring holds a power of two of entries, not {entries}")
    cdef uint32_t[:] words = memoryview(ring).cast("B").cast("I")
    if <uint64_t>words.shape[0] * 4 < <uint64_t>entries * 16:
        raise ArgumentError(f"a dirty ring of {entries} entries needs {entries * 16} bytes; "
                            f"this buffer has {words.shape[0] * 4}")
    return words


def dirty_ring_collect(ring, uint32_t entries, uint32_t fetch):
    """Harvests the dirty entries of a vCPU's dirty ring (``ring``: its
    writable mapping of ``entries`` struct kvm_dirty_gfn) from index
    ``fetch`` on, in order, marking each harvested (csrc/dirty_ring.h).
    Returns ``(fetch, [(slot, offset), ...])``; call KVM_RESET_DIRTY_RINGS
    afterwards."""
    cdef uint32_t[:] words = _ring_window(ring, entries)
    cdef uint32_t slots[_DIRTY_RING_BATCH]
    cdef uint64_t offsets[_DIRTY_RING_BATCH]
    cdef uint32_t n, i
    found = []
    while True:
        with nogil:
            n = pvt_dirty_ring_collect(<void *>&words[0], entries, &fetch, slots, offsets,
                                       _DIRTY_RING_BATCH)
        for i in range(n):
            found.append((slots[i], offsets[i]))
        if n < _DIRTY_RING_BATCH:
            return fetch, found


def dirty_ring_mark(ring, uint32_t entries, uint32_t fetch, list bitmaps):
    """:func:`dirty_ring_collect`, but sets each page's bit in
    ``bitmaps[slot]`` (a bytearray, one bit per page of that memory slot)
    instead of listing it.  Returns ``(fetch, harvested, stray)``: stray
    entries name a slot or page no bitmap holds (they are harvested too)."""
    cdef uint32_t[:] words = _ring_window(ring, entries)
    cdef uint32_t slots[_DIRTY_RING_BATCH]
    cdef uint64_t offsets[_DIRTY_RING_BATCH]
    cdef uint32_t n, i, slot, current = 0xFFFFFFFF
    cdef uint64_t offset, harvested = 0, stray = 0
    cdef uint8_t[::1] bitmap = None
    cdef uint32_t nslots = len(bitmaps)
    views = [None if b is None else memoryview(b).cast("B") for b in bitmaps]
    while True:
        with nogil:
            n = pvt_dirty_ring_collect(<void *>&words[0], entries, &fetch, slots, offsets,
                                       _DIRTY_RING_BATCH)
        harvested += n
        for i in range(n):
            slot, offset = slots[i], offsets[i]
            if slot != current:  # entries come in runs of one slot
                current = slot
                bitmap = views[slot] if slot < nslots else None
            if bitmap is None or offset >> 3 >= <uint64_t>bitmap.shape[0]:
                stray += 1
                continue
            bitmap[offset >> 3] |= 1 << (offset & 7)
        if n < _DIRTY_RING_BATCH:
            return fetch, harvested, stray



def dirty_ring_recover(ring, uint32_t entries, uint32_t fetch):
    """The harvest of a ring KVM may have overrun (csrc/dirty_ring.h):
    returns ``([(slot, offset), ...], advance, all_dirty)``; ``fetch +
    advance`` is KVM's next entry, and the entries up to there (one lap at
    most) are marked harvested."""
    cdef uint32_t[:] words = _ring_window(ring, entries)
    cdef uint8_t *dirty = <uint8_t *>malloc(entries)
    cdef uint32_t *slots = <uint32_t *>malloc(entries * sizeof(uint32_t))
    cdef uint64_t *offsets = <uint64_t *>malloc(entries * sizeof(uint64_t))
    cdef uint32_t taken = 0, advance = 0, i
    cdef int all_dirty = 0
    try:
        if dirty == NULL or slots == NULL or offsets == NULL:
            raise MemoryError()
        with nogil:
            taken = pvt_dirty_ring_recover(<void *>&words[0], entries, fetch, dirty, slots,
                                           offsets, &advance, &all_dirty)
        return [(slots[i], offsets[i]) for i in range(taken)], advance, bool(all_dirty)
    finally:
        free(dirty)
        free(slots)
        free(offsets)


def dirty_ring_mark_harvested(ring, uint32_t entries, uint32_t first, uint32_t count):
    """Marks ``count`` entries from ``first`` on harvested."""
    cdef uint32_t[:] words = _ring_window(ring, entries)
    pvt_dirty_ring_mark_harvested(<void *>&words[0], entries, first, count)


# -- fast restores (session 6, "fast"): a vCPU state's writes in one call ---
# (csrc/state_writes.c; used by pyvt.Vcpu.restore_state for
# user_mode_only restores)

def restore_user_mode(VcpuLoop loop, const uint8_t[::1] regs, unsigned long sregs_request,
                      size_t sregs, size_t sregs_common, size_t xsave, size_t fpu,
                      const uint8_t[::1] events, bint synced):
    """Writes what CPL-3 code can change into ``loop``'s vCPU, in the order
    and with the skips of pyvt.vcpu_state.write_user_mode: ``regs`` (bytes
    of a struct kvm_regs, through the run page), the special registers
    (``sregs``: the address of the struct ``sregs_request`` takes; skipped
    if ``synced`` and the run page's first ``sregs_common`` bytes match),
    the XSAVE area and FPU (addresses; 0: not written) and ``events``
    (bytes of a struct kvm_vcpu_events, skipped if ``synced`` and equal;
    empty: none).  The addresses must stay valid during the call.  Returns
    ``(writes, errno, ioctl)``: the state-changing ioctls made, and the
    errno and name of the one that failed (0, None if none)."""
    cdef pvt_user_mode_state state
    cdef const char *failed = NULL
    cdef int writes = 0
    cdef int rc
    if loop.v.run == NULL:
        raise ClosedError("the vCPU is closed")
    if <size_t>regs.shape[0] != sizeof(kvm_regs):
        raise ArgumentError(f"regs must be {sizeof(kvm_regs)} bytes, not {regs.shape[0]}")
    if events.shape[0] != 0 and <size_t>events.shape[0] != sizeof(kvm_vcpu_events):
        raise ArgumentError(f"events must be {sizeof(kvm_vcpu_events)} bytes or none, "
                            f"not {events.shape[0]}")
    if sregs == 0 or sregs_common > sizeof(kvm_sregs):
        raise ArgumentError("restore_user_mode needs the special registers' struct")
    state.regs = <const kvm_regs *>&regs[0]
    state.sregs_request = sregs_request
    state.sregs = <const void *>sregs
    state.sregs_common = sregs_common
    state.xsave = <const void *>xsave
    state.fpu = <const void *>fpu
    state.events = <const kvm_vcpu_events *>&events[0] if events.shape[0] else NULL
    with nogil:
        rc = pvt_restore_user_mode(loop.v.fd, loop.v.run, &state, synced, &writes, &failed)
    if rc:
        return writes, -rc, (<bytes>failed).decode()
    return writes, 0, None


cdef class StateWrites:
    """A batch of state-changing vCPU ioctls, made in order by one call
    (pvt_state_write_batch): ``writes`` is a list of ``(request, address,
    expect)``, address that of the ioctl's argument (kept valid by the
    caller while the batch lives), expect what the ioctl must return."""

    cdef pvt_state_write *writes
    cdef int n

    def __init__(self, list writes):
        cdef int i
        free(self.writes)
        self.writes = <pvt_state_write *>calloc(max(len(writes), 1), sizeof(pvt_state_write))
        if self.writes == NULL:
            raise MemoryError()
        self.n = len(writes)
        for i, (request, address, expect) in enumerate(writes):
            self.writes[i].request = request
            self.writes[i].arg = <const void *><size_t>address
            self.writes[i].expect = expect

    def __dealloc__(self):
        free(self.writes)

    def __len__(self):
        return self.n

    def write(self, int fd):
        """Makes the ioctls on ``fd``: returns ``(done, error)``, how many
        succeeded and, if one did not, its -errno or the count it returned
        instead of its ``expect``."""
        cdef int error = 0
        cdef int done
        with nogil:
            done = pvt_state_write_batch(fd, self.writes, self.n, &error)
        return done, error


def restore_logged_pages(int vm_fd, uint32_t slot, uint64_t pages, uint8_t[::1] target,
                         const uint8_t[::1] image, const uint8_t[::1] data,
                         const uint8_t[::1] also):
    """A memory slot's restore step (csrc/page_restore.c): KVM_GET_DIRTY_LOG
    of ``slot`` (``pages`` pages, mapped by ``target``), then every page it
    or ``also`` names is copied back from ``image`` (the snapshot image's
    mapping) where ``data`` (the image's data pages) says it holds data,
    zeroed elsewhere.  ``data`` and ``also`` are little-endian page bitmaps
    of ``(pages + 63) // 64`` words.  Both mappings stay exported during
    the call (neither can be unmapped under it).  Returns the dirty log as
    bytes of that size; raises KvmError (and copies nothing) if KVM refuses it."""
    cdef size_t size = (pages + 63) // 64 * 8
    cdef size_t span = pages * PVT_PAGE_RESTORE_PAGE_SIZE
    cdef int rc
    if pages == 0:
        raise ArgumentError("a memory slot has at least one page")
    if <size_t>data.shape[0] != size or <size_t>also.shape[0] != size:
        raise ArgumentError(f"the page bitmaps must be {size} bytes, not "
                            f"{data.shape[0]} and {also.shape[0]}")
    if <size_t>target.shape[0] < span or <size_t>image.shape[0] < span:
        raise ArgumentError(f"the mappings must hold {pages} pages")
    logged = PyBytes_FromStringAndSize(NULL, size)
    cdef uint64_t *log = <uint64_t *>PyBytes_AS_STRING(logged)
    with nogil:
        rc = pvt_restore_logged_pages(vm_fd, slot, pages, &target[0], &image[0],
                                      <const uint64_t *>&data[0],
                                      <const uint64_t *>&also[0], log)
    if rc:
        raise KvmError("KVM_GET_DIRTY_LOG", -rc, f"memory slot {slot}")
    return logged


#: The page size restore_logged_pages copies in (the host's must match).
PAGE_RESTORE_PAGE_SIZE = PVT_PAGE_RESTORE_PAGE_SIZE


def kvm_runs(VcpuLoop loop):
    """How many times ``loop``'s vCPU has returned from KVM_RUN (its run
    loop's and its settling of pending accesses'): what pyvt.Vcpu compares
    to know that no KVM_RUN came in between, without building stats."""
    return loop.v.kvm_exits


# -- pyvt.Sandbox's native call path (csrc/sandbox_call.c) ----------------------

#: SandboxCalls.run()'s returns besides a run loop stop: the call returned
#: and its reset is done (memory and user-mode state), or only its memory
#: (the caller writes the whole state).
SANDBOX_RESET_DONE = 200
SANDBOX_RESET_MEMORY = 201


cdef class SandboxCalls:
    """pyvt.Sandbox's calls on one vCPU and one dirty-logged memory slot:
    argument copies into the slot, the entry registers, and the run; a call
    that returned through the trampoline with no other exit (no device, no
    host function, no coalesced write: nothing but memory and CPL-3 state
    can differ) is reset here too (csrc/sandbox_call.h says when the
    user-mode reset is enough).  Built by pyvt.Sandbox from the snapshot it
    takes; the mappings stay exported while this object lives."""

    cdef VcpuLoop loop
    cdef pvt_sandbox_entry entry
    cdef pvt_sandbox_reset_plan plan
    cdef uint8_t[::1] target
    cdef const uint8_t[::1] image
    cdef bytes regs, data, reserved, events
    cdef object keep  # the structs the state plan's addresses point into
    cdef uint64_t *also
    cdef uint64_t *written
    cdef uint64_t words
    cdef uint16_t exit_port
    cdef uint64_t return_low, return_high
    cdef uint64_t exits_at_entry, coalesced_at_entry
    # kvm_exits when the last call returned here: while unchanged, the
    # pending port write is the trampoline's, which a new entry cancels.
    cdef uint64_t returned_at

    def __init__(self, VcpuLoop loop, int vm_fd, uint32_t slot, uint64_t pages,
                 uint8_t[::1] target, const uint8_t[::1] image, bytes data, bytes reserved,
                 bytes regs, unsigned long sregs_request, size_t sregs, size_t sregs_common,
                 size_t xsave, size_t fpu, bytes events, uint64_t stub, uint64_t rsp,
                 int exit_port, uint64_t return_low, uint64_t return_high, keep):
        self.words = (pages + 63) // 64
        if pages == 0 or <size_t>target.shape[0] < pages * PVT_PAGE_RESTORE_PAGE_SIZE or \
                <size_t>image.shape[0] < pages * PVT_PAGE_RESTORE_PAGE_SIZE:
            raise ArgumentError(f"the mappings must hold the slot's {pages} pages")
        if <size_t>len(data) != self.words * 8 or <size_t>len(reserved) != self.words * 8:
            raise ArgumentError(f"the page bitmaps must be {self.words * 8} bytes")
        if <size_t>len(regs) != sizeof(kvm_regs):
            raise ArgumentError(f"regs must be {sizeof(kvm_regs)} bytes, not {len(regs)}")
        if len(events) != 0 and <size_t>len(events) != sizeof(kvm_vcpu_events):
            raise ArgumentError(f"events must be {sizeof(kvm_vcpu_events)} bytes or none")
        if sregs == 0 or sregs_common > sizeof(kvm_sregs):
            raise ArgumentError("the sandbox's reset needs the special registers' struct")
        self.also = <uint64_t *>calloc(self.words, 8)
        self.written = <uint64_t *>calloc(self.words, 8)
        if self.also == NULL or self.written == NULL:
            raise MemoryError()
        self.loop, self.target, self.image = loop, target, image
        self.regs, self.data, self.reserved, self.events, self.keep = \
            regs, data, reserved, events, keep
        self.entry.regs = <const kvm_regs *>PyBytes_AS_STRING(regs)
        self.entry.stub = stub
        self.entry.rsp = rsp
        self.plan.vm_fd = vm_fd
        self.plan.slot = slot
        self.plan.pages = pages
        self.plan.target = &target[0]
        self.plan.image = &image[0]
        self.plan.data = <const uint64_t *>PyBytes_AS_STRING(data)
        self.plan.reserved = <const uint64_t *>PyBytes_AS_STRING(reserved)
        self.plan.also = self.also
        self.plan.written = self.written
        self.plan.state.regs = self.entry.regs
        self.plan.state.sregs_request = sregs_request
        self.plan.state.sregs = <const void *>sregs
        self.plan.state.sregs_common = sregs_common
        self.plan.state.xsave = <const void *>xsave
        self.plan.state.fpu = <const void *>fpu
        self.plan.state.events = <const kvm_vcpu_events *>PyBytes_AS_STRING(events) \
            if len(events) else NULL
        self.exit_port = exit_port
        self.return_low, self.return_high = return_low, return_high
        self.returned_at = <uint64_t>-1

    def __dealloc__(self):
        free(self.also)
        free(self.written)

    def copy(self, uint64_t address, const uint8_t[::1] data):
        """Writes ``data`` to guest-physical ``address`` of the slot; its
        pages are copied back at the next reset."""
        cdef uint64_t n = data.shape[0], page
        if n == 0:
            return
        if address > self.plan.pages * PVT_PAGE_RESTORE_PAGE_SIZE or \
                n > self.plan.pages * PVT_PAGE_RESTORE_PAGE_SIZE - address:
            raise ArgumentError(f"{n} bytes at {address:#x} lie outside the sandbox's memory")
        memcpy(&self.target[address], &data[0], n)
        page = address // PVT_PAGE_RESTORE_PAGE_SIZE
        while page <= (address + n - 1) // PVT_PAGE_RESTORE_PAGE_SIZE:
            self.also[page // 64] |= 1ull << (page % 64)
            page += 1

    def enter(self, uint64_t function, uint64_t a0=0, uint64_t a1=0, uint64_t a2=0,
              uint64_t a3=0, uint64_t a4=0, uint64_t a5=0):
        """Puts the entry registers of a call of ``function`` in the run
        page.  False (nothing done) if the vCPU owes an access that is not
        the last call's trampoline write: the caller settles it first."""
        cdef uint64_t args[6]
        cdef pvt_vcpu *v = &self.loop.v
        if v.run == NULL:
            raise ClosedError("the vCPU is closed")
        # The trampoline's OUT stays pending: KVM's completion of it does
        # nothing once RIP moved (see Vcpu._defer_port_write).
        if v.pending_io != PVT_PENDING_NONE and not (
                v.pending_io == PVT_PENDING_WRITE and v.kvm_exits == self.returned_at):
            return False
        args[0], args[1], args[2], args[3], args[4], args[5] = a0, a1, a2, a3, a4, a5
        pvt_sandbox_enter(v.run, &self.entry, function, args)
        self.exits_at_entry = v.kvm_exits
        self.coalesced_at_entry = v.coalesced
        return True

    def run(self, double timeout, double tick):
        """Runs the vCPU (VcpuLoop.run).  A call that returned with no other
        exit since enter() is reset: returns ``(SANDBOX_RESET_DONE or
        SANDBOX_RESET_MEMORY, rax, 0)``; any other stop as VcpuLoop.run."""
        cdef pvt_vcpu *v = &self.loop.v
        cdef int rc, writes = 0
        cdef const char *failed = NULL
        cdef uint64_t rip, rax
        stop = self.loop.run(timeout, tick)
        if stop[0] != STOP_DEVICE or stop[2] != self.exit_port or v.run == NULL:
            return stop
        rip = v.run.s.regs.regs.rip  # KVM_SYNC_X86_REGS: as the exit left it
        if (rip < self.return_low or rip > self.return_high
                or v.kvm_exits != self.exits_at_entry + 1 or v.coalesced != self.coalesced_at_entry):
            return stop
        rax = v.run.s.regs.regs.rax
        with nogil:
            rc = pvt_sandbox_reset(v.fd, v.run, &self.plan, &writes, &failed)
        self.returned_at = v.kvm_exits
        if rc < 0:
            raise KvmError((<bytes>failed).decode() if failed != NULL else "KVM_GET_DIRTY_LOG",
                           -rc, "resetting the sandbox after a call")
        return (SANDBOX_RESET_DONE if rc == PVT_SANDBOX_RESET_DONE else SANDBOX_RESET_MEMORY,
                rax, writes)

    def take_host_writes(self):
        """The pages copy() wrote since the last reset, as a little-endian
        bitmap, forgotten here: for a call that left the native path, whose
        reset pyvt.memory's bookkeeping makes (as for any host write)."""
        taken = PyBytes_FromStringAndSize(<const char *>self.also, self.words * 8)
        memset(self.also, 0, self.words * 8)
        return taken

    @property
    def written(self):
        """The pages the last reset copied back, as a little-endian bitmap."""
        return PyBytes_FromStringAndSize(<const char *>self.written, self.words * 8)
