"""A PCI bus: the host bridge, configuration space, BARs, INTx and MSI-X.

``vm.pci`` (a :class:`PciBus`, made on first use) claims the configuration
mechanism #1 ports 0xcf8-0xcff and the ECAM window (:data:`ECAM_BASE`, one
bus) and puts a host bridge at 00.0.  Devices are :class:`PciDevice`
subclasses written in Python::

    class Mine(pyvt.pci.PciDevice):
        def __init__(self):
            super().__init__(0x1af4, 0x10ff, 0xff0000)
            self.add_bar(0, 0x1000)
        def on_bar_read(self, index, offset, size):
            return 42
    vm.pci.add(Mine())

There is no firmware: like a BIOS, pyvt assigns every BAR when the device
is added (I/O BARs from :data:`IO_WINDOW`, memory BARs from
:data:`MMIO32_WINDOW`, 64-bit ones above it if that is full) and turns the
decoders on; Linux keeps those addresses.  The guest may size and move BARs
as on hardware: accesses follow the BAR (``on_bar_moved`` tells the device).

Interrupts: INTx pin ``p`` (1-4) of slot ``s`` is GSI
``INTX_GSI_BASE + (s + p - 1) % 4``, level-triggered through the in-kernel
IOAPIC (the DSDT's ``_PRT`` says the same); MSI-X through ``KVM_SIGNAL_MSI``
or, for native workers, eventfds bound with KVM irqfd to GSI routes kept in
step with the guest's table (:class:`Msix`).
"""

from __future__ import annotations

import os
import select
import struct
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Set, Tuple

from .errors import ArgumentError, ArgumentTypeError, DeviceError, Error, RegionOverlapError

# -- the address map (the DSDT's _CRS and the e820 map say the same) ---------

#: The ECAM (memory-mapped configuration) window: 1 MiB per bus, bus 0 only.
ECAM_BASE = 0xB0000000
ECAM_BUSES = 1
ECAM_SIZE = ECAM_BUSES << 20
#: Where 32-bit memory BARs go: [start, end), below the IOAPIC.
MMIO32_WINDOW = (0xC0000000, 0xFEC00000)
#: Where 64-bit memory BARs go when the 32-bit window is full: [start, end),
#: above any RAM pyvt can give a VM with a PCI bus (the ECAM window caps it
#: below 4 GiB).
MMIO64_WINDOW = (1 << 36, 1 << 37)
#: Where I/O BARs go: [start, end), above every port a PC device uses.
IO_WINDOW = (0x1000, 0x10000)
#: Configuration mechanism #1 (served in Python: there is no C side):
#: CONFIG_ADDRESS at 0xcf8, then the CONFIG_DATA window at 0xcfc-0xcff.
CONFIG_IO = range(0xCF8, 0xD00)
CONFIG_ADDRESS = CONFIG_IO.start
CONFIG_DATA = CONFIG_IO.start + 4
#: The first of the four GSIs INTA-INTD are swizzled onto (IOAPIC pins 16-19).
INTX_GSI_BASE = 16
#: The first GSI the bus gives MSI-X routes (0-23 are the irqchip's pins).
MSI_GSI_BASE = 24
MSI_ADDRESS_BASE = 0xFEE00000
SLOTS = 32
CONFIG_SIZE = 4096

# Standard header offsets and bits (PCI Local Bus 3.0, chapter 6).
VENDOR_ID, DEVICE_ID, COMMAND, STATUS = 0x00, 0x02, 0x04, 0x06
REVISION_ID, CLASS_CODE, CACHE_LINE_SIZE, LATENCY_TIMER, HEADER_TYPE = 0x08, 0x09, 0x0C, 0x0D, 0x0E
BAR0, SUBSYSTEM_VENDOR_ID, SUBSYSTEM_ID, CAPABILITIES_POINTER = 0x10, 0x2C, 0x2E, 0x34
INTERRUPT_LINE, INTERRUPT_PIN = 0x3C, 0x3D
COMMAND_IO, COMMAND_MEMORY, COMMAND_MASTER, COMMAND_INTX_DISABLE = 1 << 0, 1 << 1, 1 << 2, 1 << 10
COMMAND_WRITABLE = COMMAND_IO | COMMAND_MEMORY | COMMAND_MASTER | (1 << 6) | (1 << 8) | COMMAND_INTX_DISABLE
STATUS_INTERRUPT, STATUS_CAPABILITIES = 1 << 3, 1 << 4
STATUS_ERRORS = 0xF900  # write-1-to-clear error bits
CAP_MSIX = 0x11
CAP_VENDOR = 0x09
CAPABILITIES_START = 0x40
MSIX_ENABLE, MSIX_FUNCTION_MASK = 1 << 15, 1 << 14
MSIX_ENTRY_SIZE = 16
MSIX_VECTOR_MASKED = 1
BAR_KINDS = ("mem32", "mem64", "io")

#: The host bridge at 00.0: Intel's Q35 MCH, as QEMU's q35 machine has it.
HOST_BRIDGE_IDS = (0x8086, 0x29C0, 0x060000)


def _int(value, what: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ArgumentTypeError(f"{what} must be an int, not {value!r}")
    if not low <= value <= high:
        raise ArgumentError(f"{what} must be in {low:#x}-{high:#x}, not {value:#x}")
    return value


def _check_access(offset: int, size: int, limit: int, what: str) -> None:
    if size not in (1, 2, 4, 8) or offset < 0 or offset + size > limit:
        raise ArgumentError(f"{what}: a {size}-byte access at {offset:#x} is outside 0-{limit - 1:#x}")


def intx_gsi(slot: int, pin: int) -> int:
    """The GSI INTx ``pin`` (1 = INTA ... 4 = INTD) of ``slot`` raises."""
    return INTX_GSI_BASE + (slot + pin - 1) % 4


class Bar:
    """One base address register: ``index`` (0-5), ``size`` (a power of
    two), ``kind`` (``"mem32"``, ``"mem64"`` or ``"io"``), ``prefetchable``.
    ``address`` is where it decodes now, None while its decoder is off (or it
    points nowhere usable, as during the guest's sizing)."""

    def __init__(self, device: "PciDevice", index: int, size: int, kind: str, prefetchable: bool):
        self.device = device
        self.index = index
        self.size = size
        self.kind = kind
        self.prefetchable = prefetchable
        self.address: Optional[int] = None

    @property
    def is_io(self) -> bool:
        return self.kind == "io"

    @property
    def flags(self) -> int:
        """The BAR register's low, read-only bits."""
        if self.is_io:
            return 1
        return (4 if self.kind == "mem64" else 0) | (8 if self.prefetchable else 0)

    def __repr__(self) -> str:
        where = "off" if self.address is None else f"{self.address:#x}"
        return f"<Bar {self.index} {self.kind} {self.size:#x} at {where}>"


class PciDevice:
    """A PCI function with a type-0 header, written in Python.

    The base serves the standard header (command/status, BARs with sizing,
    the capability list, interrupt line/pin) from :attr:`config`, 4 KiB;
    subclasses add BARs and capabilities in ``__init__`` and override the
    ``on_*`` hooks.  ``interrupt_pin`` is 1-4 (INTA-INTD) or 0 for none.
    ``vm`` is the VM once :meth:`PciBus.add` put it there.
    """

    def __init__(self, vendor_id: int, device_id: int, class_code: int, *, revision: int = 0,
                 subsystem_vendor_id: int = 0, subsystem_id: int = 0, interrupt_pin: int = 1):
        self.config = bytearray(CONFIG_SIZE)
        self._wmask = bytearray(CONFIG_SIZE)   # bits the guest may write
        self._w1c = bytearray(CONFIG_SIZE)     # bits a guest 1 clears
        self.bars: Dict[int, Bar] = {}
        self.msix: Optional[Msix] = None
        self.vm: Any = None  # the Vm, once on its bus
        self.bus: Optional[PciBus] = None
        self.slot: Optional[int] = None
        self._intx_level = False
        self._intx_asserted = False
        self._intx_fds: Optional[Tuple[int, int]] = None
        self._last_cap = 0
        self._cap_end = CAPABILITIES_START
        self._capabilities: Dict[int, int] = {}  # offset -> cap ID
        self._put(VENDOR_ID, 2, _int(vendor_id, "vendor_id", 0, 0xFFFE))
        self._put(DEVICE_ID, 2, _int(device_id, "device_id", 0, 0xFFFF))
        self._put(REVISION_ID, 1, _int(revision, "revision", 0, 0xFF))
        self._put(CLASS_CODE, 3, _int(class_code, "class_code", 0, 0xFFFFFF))
        self._put(SUBSYSTEM_VENDOR_ID, 2, _int(subsystem_vendor_id, "subsystem_vendor_id", 0, 0xFFFF))
        self._put(SUBSYSTEM_ID, 2, _int(subsystem_id, "subsystem_id", 0, 0xFFFF))
        self._put(INTERRUPT_PIN, 1, _int(interrupt_pin, "interrupt_pin", 0, 4))
        self._mask(COMMAND, 2, COMMAND_WRITABLE)
        self._w1c[STATUS:STATUS + 2] = STATUS_ERRORS.to_bytes(2, "little")
        self._mask(CACHE_LINE_SIZE, 1, 0xFF)
        self._mask(LATENCY_TIMER, 1, 0xFF)
        self._mask(INTERRUPT_LINE, 1, 0xFF)

    # -- the raw configuration space ------------------------------------------

    def _put(self, offset: int, size: int, value: int) -> None:
        self.config[offset:offset + size] = value.to_bytes(size, "little")

    def _get(self, offset: int, size: int) -> int:
        return int.from_bytes(self.config[offset:offset + size], "little")

    def _mask(self, offset: int, size: int, bits: int) -> None:
        self._wmask[offset:offset + size] = bits.to_bytes(size, "little")

    @property
    def command(self) -> int:
        return self._get(COMMAND, 2)

    def _lock(self):
        return self.bus._lock if self.bus is not None else _NO_LOCK

    def config_read(self, offset: int, size: int) -> int:
        """What the guest reads from configuration space."""
        _check_access(offset, size, CONFIG_SIZE, "PCI configuration space")
        with self._lock():
            return self._get(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        """A guest write: writable bits change, write-1-to-clear bits clear,
        BAR and command changes remap, then :meth:`on_config_write`."""
        _check_access(offset, size, CONFIG_SIZE, "PCI configuration space")
        value &= (1 << (8 * size)) - 1
        with self._lock():
            for i in range(size):
                byte = (value >> (8 * i)) & 0xFF
                o = offset + i
                old = self.config[o]
                self.config[o] = ((old & ~self._wmask[o]) | (byte & self._wmask[o])) & ~(
                    byte & self._w1c[o]) & 0xFF
            if self._overlaps(offset, size, COMMAND, 2) or self._overlaps(offset, size, BAR0, 24):
                self._update_bars()
            if self._overlaps(offset, size, COMMAND, 2):
                self._update_intx()
            if self.msix is not None and self._overlaps(offset, size, self.msix.cap_offset, 4):
                self.msix._control_written()
        self.on_config_write(offset, size, value)

    @staticmethod
    def _overlaps(offset: int, size: int, start: int, length: int) -> bool:
        return offset < start + length and start < offset + size

    # -- hooks ---------------------------------------------------------------

    def on_bar_read(self, index: int, offset: int, size: int) -> int:
        """A guest read of ``size`` bytes at ``offset`` in BAR ``index``."""
        return 0

    def on_bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        """A guest write of ``size`` bytes at ``offset`` in BAR ``index``."""

    def on_bar_moved(self, index: int, old_address: Optional[int],
                     new_address: Optional[int]) -> None:
        """BAR ``index`` now decodes at ``new_address`` (None: off)."""

    def on_config_write(self, offset: int, size: int, value: int) -> None:
        """Called after the base handled a configuration write."""

    # -- BARs ---------------------------------------------------------------

    def add_bar(self, index: int, size: int, *, kind: str = "mem32",
                prefetchable: bool = False) -> Bar:
        """Declares BAR ``index`` (a 64-bit one takes ``index + 1`` too) of
        ``size`` bytes, a power of two (memory: at least 16; I/O: 4-256)."""
        if kind not in BAR_KINDS:
            raise ArgumentError(f"BAR kind must be one of {', '.join(BAR_KINDS)}, not {kind!r}")
        _int(index, "BAR index", 0, 4 if kind == "mem64" else 5)
        low, high = (4, 256) if kind == "io" else (16, 1 << 40 if kind == "mem64" else 1 << 31)
        _int(size, "BAR size", low, high)
        if size & (size - 1):
            raise ArgumentError(f"BAR size must be a power of two, not {size:#x}")
        if kind == "io" and prefetchable:
            raise ArgumentError("an I/O BAR cannot be prefetchable")
        taken = {i for bar in self.bars.values()
                 for i in ((bar.index, bar.index + 1) if bar.kind == "mem64" else (bar.index,))}
        wanted = {index, index + 1} if kind == "mem64" else {index}
        if taken & wanted:
            raise ArgumentError(f"BAR {index} overlaps a BAR already declared ({sorted(taken)})")
        bar = Bar(self, index, size, kind, prefetchable)
        offset = BAR0 + 4 * index
        mask = ~(size - 1) & (0xFFFFFFFC if kind == "io" else 0xFFFFFFF0)
        self._mask(offset, 4, mask & 0xFFFFFFFF)
        self._put(offset, 4, bar.flags)
        if kind == "mem64":
            self._mask(offset + 4, 4, (~((size - 1) >> 32)) & 0xFFFFFFFF)
        self.bars[index] = bar
        if self.bus is not None:
            with self._lock():
                self.bus._assign(bar)
                self._put(COMMAND, 2, self.command | (COMMAND_IO if bar.is_io else COMMAND_MEMORY))
                self._update_bars()
        return bar

    def bar_register(self, index: int) -> int:
        """The address BAR ``index`` holds (whether or not it decodes)."""
        bar = self.bars[index]
        offset = BAR0 + 4 * index
        address = self._get(offset, 4) & (0xFFFFFFFC if bar.is_io else 0xFFFFFFF0)
        if bar.kind == "mem64":
            address |= self._get(offset + 4, 4) << 32
        return address

    def _set_bar_address(self, bar: Bar, address: int) -> None:
        offset = BAR0 + 4 * bar.index
        self._put(offset, 4, (address & 0xFFFFFFFF) | bar.flags)
        if bar.kind == "mem64":
            self._put(offset + 4, 4, address >> 32)

    def _update_bars(self) -> None:
        """Maps each BAR where its register says, if its decoder is on."""
        if self.bus is None:
            return  # not on a bus yet: add() maps them
        command = self.command
        for bar in self.bars.values():
            enabled = command & (COMMAND_IO if bar.is_io else COMMAND_MEMORY)
            address = self.bar_register(bar.index) if enabled else None
            if address == 0:
                address = None
            if address == bar.address:
                continue
            old = bar.address
            if old is not None:
                self.bus._unmap(bar)
            if address is not None and not self.bus._map(bar, address):
                address = None
            bar.address = address
            if address != old:
                self.on_bar_moved(bar.index, old, address)

    def _bar_access(self, bar: Bar, offset: int, size: int, is_write: bool,
                    value: int) -> Optional[int]:
        msix = self.msix
        if msix is not None and msix.bar == bar.index and msix._claims(offset, size):
            if is_write:
                msix._write(offset, size, value)
                return None
            return msix._read(offset, size)
        if is_write:
            self.on_bar_write(bar.index, offset, size, value)
            return None
        return self.on_bar_read(bar.index, offset, size)

    # -- capabilities ------------------------------------------------------

    def add_capability(self, cap_id: int, data: bytes, *, writable: Optional[bytes] = None) -> int:
        """Appends capability ``cap_id`` to the list; ``data`` is what follows
        its two-byte header (ID, next pointer), e.g. a virtio vendor
        capability's ``cap_len, cfg_type, bar...``.  ``writable`` (as long as
        ``data``) masks the bits the guest may write (default: none).
        Returns the capability's offset in configuration space."""
        _int(cap_id, "capability ID", 0, 0xFF)
        data = bytes(data)
        if writable is not None and len(writable) != len(data):
            raise ArgumentError(f"writable must be as long as data ({len(data)} bytes)")
        offset = self._cap_end
        length = 2 + len(data)
        if offset + length > 0x100:
            raise DeviceError(f"no room for a {length}-byte capability: the list is full "
                              f"(0x{CAPABILITIES_START:x}-0xff)")
        self.config[offset] = cap_id
        self.config[offset + 2:offset + length] = data
        if writable is not None:
            self._wmask[offset + 2:offset + length] = writable
        if self._last_cap:
            self.config[self._last_cap + 1] = offset
        else:
            self.config[CAPABILITIES_POINTER] = offset
            self._put(STATUS, 2, self._get(STATUS, 2) | STATUS_CAPABILITIES)
        self._last_cap = offset
        self._cap_end = (offset + length + 3) & ~3
        self._capabilities[offset] = cap_id
        return offset

    def capabilities(self) -> Dict[int, int]:
        """``{offset: capability ID}`` in list order."""
        return dict(self._capabilities)

    def enable_msix(self, vectors: int, bar: int, table_offset: int, pba_offset: int) -> "Msix":
        """Adds the MSI-X capability: ``vectors`` vectors, the table at
        ``table_offset`` and the pending-bit array at ``pba_offset`` in BAR
        ``bar`` (declared already), served by the base."""
        if self.msix is not None:
            raise DeviceError("this device has MSI-X already")
        self.msix = Msix(self, vectors, bar, table_offset, pba_offset)
        return self.msix

    # -- INTx -----------------------------------------------------------------

    @property
    def intx_pin(self) -> int:
        return self.config[INTERRUPT_PIN]

    @property
    def intx_gsi(self) -> Optional[int]:
        """The GSI this device's INTx pin raises (None: no pin or not added)."""
        if self.slot is None or not self.intx_pin:
            return None
        return intx_gsi(self.slot, self.intx_pin)

    def set_intx(self, level: bool) -> None:
        """Asserts (True) or de-asserts the INTx line, level-triggered; the
        status register's interrupt bit follows, the command register's
        INTx-disable bit holds the line low."""
        if not self.intx_pin:
            raise DeviceError("this device has no INTx pin (interrupt_pin=0)")
        with self._lock():
            self._intx_level = bool(level)
            self._update_intx()

    def _update_intx(self) -> None:
        status = self._get(STATUS, 2) & ~STATUS_INTERRUPT
        self._put(STATUS, 2, status | (STATUS_INTERRUPT if self._intx_level else 0))
        asserted = self._intx_level and not self.command & COMMAND_INTX_DISABLE
        if asserted != self._intx_asserted and self.vm is not None:
            self.vm._require_irqchip("INTx")
            self.vm.fd.irq_line(self.intx_gsi, asserted)
            self._intx_asserted = asserted

    def intx_eventfd(self) -> int:
        """An eventfd that asserts INTx when written (KVM irqfd with resample:
        the line stays up until the guest EOIs; then KVM lowers it and
        writes :attr:`intx_resample_eventfd`, and the device writes this
        again if it still needs service).  Stable for the device's life."""
        if self.vm is None or not self.intx_pin:
            raise DeviceError("intx_eventfd needs a device with an INTx pin, added to a bus")
        if self._intx_fds is None:
            self.vm._require_irqchip("INTx")
            trigger = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            resample = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            try:
                self.vm.fd.register_irqfd(trigger, self.intx_gsi, resamplefd=resample)
            except BaseException:
                os.close(trigger)
                os.close(resample)
                raise
            self._intx_fds = (trigger, resample)
            weakref.finalize(self, _close_fds, list(self._intx_fds))
        return self._intx_fds[0]

    @property
    def intx_resample_eventfd(self) -> int:
        """The eventfd KVM writes when the guest EOIs an INTx from
        :meth:`intx_eventfd`."""
        self.intx_eventfd()
        assert self._intx_fds is not None
        return self._intx_fds[1]

    def __repr__(self) -> str:
        where = "" if self.slot is None else f" at 00:{self.slot:02x}.0"
        return (f"<{type(self).__name__} {self._get(VENDOR_ID, 2):04x}:"
                f"{self._get(DEVICE_ID, 2):04x}{where}>")


class _NoLock:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_NO_LOCK = _NoLock()


def _close_fds(fds: List[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


@dataclass
class _Vector:
    """A vector's eventfd, the GSI its irqfd raises, whether KVM has it
    bound, and the (address, data) the GSI's route sends."""
    eventfd: int
    gsi: int
    bound: bool = False
    route: Optional[Tuple[int, int]] = None


class Msix:
    """A device's MSI-X: the capability, the table and the pending-bit array
    (served in BAR ``bar``), the function mask and per-vector masks.

    :meth:`notify` delivers a vector now (``KVM_SIGNAL_MSI``), or leaves it
    pending while masked or disabled; unmasking delivers it.
    :meth:`eventfd` gives an eventfd that delivers the vector when written,
    for native workers: bound with KVM irqfd to a GSI whose MSI route
    follows the guest's table, unbound while masked (a write then leaves
    the vector pending, delivered on unmask)."""

    def __init__(self, device: PciDevice, vectors: int, bar: int, table_offset: int,
                 pba_offset: int):
        _int(vectors, "MSI-X vectors", 1, 2048)
        if bar not in device.bars or device.bars[bar].is_io:
            raise ArgumentError(f"MSI-X needs a memory BAR declared at index {bar} "
                                "(add_bar first)")
        size = device.bars[bar].size
        table_size = vectors * MSIX_ENTRY_SIZE
        pba_size = (vectors + 63) // 64 * 8
        for what, offset, length in (("table", table_offset, table_size),
                                     ("PBA", pba_offset, pba_size)):
            _int(offset, f"MSI-X {what} offset", 0, size - 1)
            if offset % 8 or offset + length > size:
                raise ArgumentError(f"the MSI-X {what} ({length:#x} bytes at {offset:#x}) must "
                                    f"be 8-byte aligned inside BAR {bar} ({size:#x} bytes)")
        if table_offset < pba_offset + pba_size and pba_offset < table_offset + table_size:
            raise ArgumentError("the MSI-X table and PBA overlap")
        self.device = device
        self.vectors = vectors
        self.bar = bar
        self.table_offset = table_offset
        self.pba_offset = pba_offset
        self._table_size = table_size
        self._pba_size = pba_size
        self.table = bytearray(table_size)
        for v in range(vectors):
            self.table[v * MSIX_ENTRY_SIZE + 12] = MSIX_VECTOR_MASKED
        self.pending: Set[int] = set()
        self._vectors: Dict[int, _Vector] = {}
        self._fds: List[int] = []
        weakref.finalize(self, _close_fds, self._fds)
        self.cap_offset = device.add_capability(CAP_MSIX, struct.pack(
            "<HII", vectors - 1, table_offset | bar, pba_offset | bar),
            writable=struct.pack("<HII", MSIX_ENABLE | MSIX_FUNCTION_MASK, 0, 0))

    # -- state ------------------------------------------------------------------

    @property
    def control(self) -> int:
        return self.device._get(self.cap_offset + 2, 2)

    @property
    def enabled(self) -> bool:
        return bool(self.control & MSIX_ENABLE)

    @property
    def function_masked(self) -> bool:
        return bool(self.control & MSIX_FUNCTION_MASK)

    def entry(self, vector: int) -> tuple:
        """``(address, data, masked)`` of ``vector`` as the guest set it."""
        address_lo, address_hi, data, control = struct.unpack_from(
            "<IIII", self.table, vector * MSIX_ENTRY_SIZE)
        return address_hi << 32 | address_lo, data, bool(control & MSIX_VECTOR_MASKED)

    def masked(self, vector: int) -> bool:
        """True while ``vector`` cannot be delivered (disabled, function or vector mask)."""
        return not self.enabled or self.function_masked or self.entry(vector)[2]

    def _check_vector(self, vector: int) -> None:
        _int(vector, "MSI-X vector", 0, self.vectors - 1)

    # -- delivery ---------------------------------------------------------------

    def notify(self, vector: int) -> bool:
        """Delivers ``vector`` now; while it is masked it becomes pending
        instead (and is delivered when unmasked).  Returns True if sent."""
        self._check_vector(vector)
        with self.device._lock():
            if self.masked(vector):
                self.pending.add(vector)
                return False
            self._send(vector)
            return True

    def _send(self, vector: int) -> None:
        address, data, _ = self.entry(vector)
        self.device.vm.signal_msi(address, data)

    def eventfd(self, vector: int) -> int:
        """An eventfd that delivers ``vector`` when written (by any thread,
        e.g. a native worker), stable for the device's life."""
        self._check_vector(vector)
        if self.device.vm is None:
            raise DeviceError("add the device to vm.pci before asking for MSI-X eventfds")
        bus = self.device.bus
        assert bus is not None  # on a VM means on its bus
        with self.device._lock():
            state = self._vectors.get(vector)
            if state is None:
                self.device.vm._require_irqchip("MSI-X")
                fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
                self._fds.append(fd)
                state = self._vectors[vector] = _Vector(fd, bus._allocate_gsi())
                self._sync(vector)
            return state.eventfd

    def _sync(self, vector: int) -> None:
        """Brings ``vector``'s irqfd binding and route in line with the
        table, and sends what is pending if it can go now."""
        masked = self.masked(vector)
        state = self._vectors.get(vector)
        bus = self.device.bus
        if state is not None and bus is not None:
            fd = self.device.vm.fd
            address, data, _ = self.entry(vector)
            if masked and state.bound:
                fd.unregister_irqfd(state.eventfd, state.gsi)
                state.bound = False
            if not masked:
                if state.route != (address, data):
                    bus._set_route(state.gsi, address, data)
                    state.route = (address, data)
                if not state.bound:
                    # KVM sends at once what the eventfd holds already.
                    fd.register_irqfd(state.eventfd, state.gsi)
                    state.bound = True
        if not masked and vector in self.pending:
            self.pending.discard(vector)
            self._send(vector)

    def _sync_all(self) -> None:
        for vector in range(self.vectors):
            self._sync(vector)

    def _control_written(self) -> None:
        self._sync_all()

    def _is_pending(self, vector: int) -> bool:
        if vector in self.pending:
            return True
        state = self._vectors.get(vector)
        if state is None or state.bound:
            return False
        return bool(select.select([state.eventfd], [], [], 0)[0])

    # -- the table and PBA, in the BAR ------------------------------------------------

    def _claims(self, offset: int, size: int) -> bool:
        return (PciDevice._overlaps(offset, size, self.table_offset, self._table_size)
                or PciDevice._overlaps(offset, size, self.pba_offset, self._pba_size))

    def _read(self, offset: int, size: int) -> int:
        with self.device._lock():
            if PciDevice._overlaps(offset, size, self.table_offset, self._table_size):
                start = offset - self.table_offset
                raw = bytes(self.table[max(start, 0):start + size]).rjust(size, b"\0")
                return int.from_bytes(raw[:size], "little")
            bits = sum(1 << v for v in range(self.vectors) if self._is_pending(v))
            pba = bits.to_bytes(self._pba_size, "little")
            start = offset - self.pba_offset
            return int.from_bytes(pba[max(start, 0):start + size].ljust(size, b"\0"), "little")

    def _write(self, offset: int, size: int, value: int) -> None:
        if not PciDevice._overlaps(offset, size, self.table_offset, self._table_size):
            return  # the PBA is read-only
        with self.device._lock():
            start = offset - self.table_offset
            raw = value.to_bytes(size, "little")
            touched = set()
            for i, byte in enumerate(raw):
                o = start + i
                if 0 <= o < self._table_size:
                    if o % MSIX_ENTRY_SIZE >= 12:  # vector control: only the mask bit
                        byte = byte & MSIX_VECTOR_MASKED if o % MSIX_ENTRY_SIZE == 12 else 0
                    self.table[o] = byte
                    touched.add(o // MSIX_ENTRY_SIZE)
            for vector in sorted(touched):
                self._sync(vector)


class HostBridge(PciDevice):
    """The host bridge at 00.0 (no BARs, no interrupt)."""

    def __init__(self):
        vendor, device, class_code = HOST_BRIDGE_IDS
        super().__init__(vendor, device, class_code, interrupt_pin=0)


class PciBus:
    """Bus 0 of ``vm``: made by ``vm.pci``.  Configuration mechanism #1
    (0xcf8/0xcfc, any width) and ECAM (:data:`ECAM_BASE`) reach every
    device; the host bridge is at slot 0."""

    def __init__(self, vm):
        self.vm = vm
        self._lock = threading.RLock()
        self._devices: Dict[int, PciDevice] = {}
        self._address = 0  # the 0xcf8 register
        self._next = {"io": IO_WINDOW[0], "mem32": MMIO32_WINDOW[0], "mem64": MMIO64_WINDOW[0]}
        self._routes: Dict[int, tuple] = {}  # GSI -> (address, data), MSI-X routes
        self._next_gsi = MSI_GSI_BASE
        self._free_gsis: List[int] = []
        if vm.memory.size > ECAM_BASE:
            raise Error(f"a VM with a PCI bus has at most {ECAM_BASE >> 20} MiB of RAM: the "
                        f"ECAM window is at {ECAM_BASE:#x} (asked for {vm.memory.size >> 20} MiB)")
        vm.on_io(CONFIG_IO, self._config_io)
        try:
            vm.on_mmio((ECAM_BASE, ECAM_SIZE), self._ecam)
        except BaseException:
            vm.off_io(CONFIG_IO)
            raise
        self.host_bridge = HostBridge()
        self.add(self.host_bridge, 0)

    # -- devices ---------------------------------------------------------------

    @property
    def devices(self) -> Dict[int, PciDevice]:
        """``{slot: device}``, the host bridge at 0."""
        return dict(self._devices)

    def find(self, slot: int) -> Optional[PciDevice]:
        return self._devices.get(slot)

    def add(self, device: PciDevice, slot: Optional[int] = None) -> int:
        """Puts ``device`` in ``slot`` (default: the first free one), assigns
        its BARs and turns their decoders on.  Returns the slot."""
        if not isinstance(device, PciDevice):
            raise ArgumentTypeError(f"vm.pci.add takes a pyvt.pci.PciDevice, not {device!r}")
        if device.bus is not None:
            raise ArgumentError(f"{device!r} is on a bus already")
        with self._lock:
            if slot is None:
                free = [s for s in range(SLOTS) if s not in self._devices]
                if not free:
                    raise DeviceError("PCI bus 0 is full (32 slots)")
                slot = free[0]
            _int(slot, "PCI slot", 0, SLOTS - 1)
            if slot in self._devices:
                raise ArgumentError(f"PCI slot {slot} holds {self._devices[slot]!r} already")
            device.bus, device.vm, device.slot = self, self.vm, slot
            try:
                command = 0
                for bar in sorted(device.bars.values(), key=lambda b: -b.size):
                    self._assign(bar)
                    command |= COMMAND_IO if bar.is_io else COMMAND_MEMORY
                if device.intx_pin:
                    device._put(INTERRUPT_LINE, 1, intx_gsi(slot, device.intx_pin))
                device._put(COMMAND, 2, device.command | command)
                device._update_bars()
            except BaseException:
                for bar in device.bars.values():
                    if bar.address is not None:
                        self._unmap(bar)
                        bar.address = None
                device.bus = device.vm = device.slot = None
                raise
            self._devices[slot] = device
        return slot

    def _assign(self, bar: Bar) -> None:
        """Gives ``bar`` the next free, naturally aligned address."""
        windows = [("io", IO_WINDOW)] if bar.is_io else [("mem32", MMIO32_WINDOW)]
        if bar.kind == "mem64" and MMIO64_WINDOW[1] <= self.vm._max_physical_address():
            windows.append(("mem64", MMIO64_WINDOW))
        for name, (_, end) in windows:
            address = (self._next[name] + bar.size - 1) & ~(bar.size - 1)
            if address + bar.size <= end:
                self._next[name] = address + bar.size
                bar.device._set_bar_address(bar, address)
                return
        raise DeviceError(f"no room for a {bar.size:#x}-byte {bar.kind} BAR in the PCI windows")

    def _map(self, bar: Bar, address: int) -> bool:
        """Serves ``bar`` at ``address``; False if it cannot be there (outside
        the address space, or over RAM or another range)."""
        def handler(exit, bar=bar, base=address):
            value = exit.value if exit.is_write else 0
            with self._lock:
                return bar.device._bar_access(bar, exit.address - base if not bar.is_io
                                              else exit.port - base, exit.size,
                                              exit.is_write, value)
        handler.__name__ = f"pci {bar.device.slot:02x}.0 BAR{bar.index}"
        try:
            if bar.is_io:
                if address + bar.size > 0x10000:
                    return False
                self.vm.on_io((address, bar.size), handler)
            else:
                if address + bar.size > self.vm._max_physical_address():
                    return False
                self.vm.on_mmio((address, bar.size), handler)
        except RegionOverlapError:
            return False
        return True

    def _unmap(self, bar: Bar) -> None:
        if bar.is_io:
            self.vm.off_io(bar.address)
        else:
            self.vm.off_mmio(bar.address)

    # -- configuration access -------------------------------------------------------

    def config_read(self, slot: int, function: int, offset: int, size: int) -> int:
        """What the guest reads; all ones where there is no device."""
        device = self._devices.get(slot) if function == 0 else None
        if device is None:
            return (1 << (8 * size)) - 1
        return device.config_read(offset, size)

    def config_write(self, slot: int, function: int, offset: int, size: int, value: int) -> None:
        device = self._devices.get(slot) if function == 0 else None
        if device is not None:
            device.config_write(offset, size, value)

    def _config_io(self, exit) -> Optional[int]:
        port, size = exit.port, exit.size
        if port == CONFIG_ADDRESS and size == 4:
            if exit.is_write:
                self._address = exit.value & 0x80FFFFFC
                return None
            return self._address
        if port < CONFIG_DATA:
            return None if exit.is_write else (1 << (8 * size)) - 1  # not a dword at 0xcf8
        address = self._address
        bus, slot, function = (address >> 16) & 0xFF, (address >> 11) & 0x1F, (address >> 8) & 7
        offset = (address & 0xFC) + port - CONFIG_DATA
        if not address & 0x80000000 or bus != 0 or offset + size > 0x100:
            return None if exit.is_write else (1 << (8 * size)) - 1
        if exit.is_write:
            self.config_write(slot, function, offset, size, exit.value)
            return None
        return self.config_read(slot, function, offset, size)

    def _ecam(self, exit) -> Optional[int]:
        where = exit.address - ECAM_BASE
        slot, function, offset = (where >> 15) & 0x1F, (where >> 12) & 7, where & 0xFFF
        sizes = [exit.size] if exit.size <= 4 else [4, 4]  # a qword: two dwords
        value = exit.value if exit.is_write else 0
        result = 0
        for i, size in enumerate(sizes):
            if offset + 4 * i + size > CONFIG_SIZE:
                part = (1 << (8 * size)) - 1
            elif exit.is_write:
                self.config_write(slot, function, offset + 4 * i, size,
                                  (value >> (32 * i)) & ((1 << (8 * size)) - 1))
                continue
            else:
                part = self.config_read(slot, function, offset + 4 * i, size)
            result |= part << (32 * i)
        return None if exit.is_write else result

    # -- MSI routes --------------------------------------------------------------------

    def _allocate_gsi(self) -> int:
        if self._free_gsis:
            return self._free_gsis.pop()
        limit = self.vm.fd.check_extension("KVM_CAP_IRQ_ROUTING") or 1024
        if self._next_gsi >= limit:
            raise DeviceError(f"no GSI left for MSI-X routes (this backend has {limit})")
        self._next_gsi += 1
        return self._next_gsi - 1

    def _set_route(self, gsi: int, address: int, data: int) -> None:
        """Points ``gsi`` at the MSI message and writes the whole table:
        the routes that are not the bus's (the irqchip's by default) stay."""
        from .gsi_routes import MsiRoute, irqchip_routes

        self._routes[gsi] = (address, data)
        ours = set(self._routes)
        current = [r for r in self.vm.gsi_routing if r.gsi not in ours] or irqchip_routes()
        routes = current + [MsiRoute(g, a, d) for g, (a, d) in sorted(self._routes.items())]
        self.vm.gsi_routing = routes


__all__ = [
    "ECAM_BASE", "ECAM_SIZE", "MMIO32_WINDOW", "MMIO64_WINDOW", "IO_WINDOW", "INTX_GSI_BASE",
    "Bar", "PciDevice", "Msix", "HostBridge", "PciBus", "intx_gsi",
]
