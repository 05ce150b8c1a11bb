"""``pyvt.Vm``: a virtual machine with guest memory, native devices, Python
I/O handlers and vCPUs, on any device speaking the KVM ABI."""

from __future__ import annotations

import errno
import threading
import types
from typing import TYPE_CHECKING, Callable, Dict, List, Mapping, Optional, Tuple, Union

from . import _native, debugging, exits, modes, msr_filter, pc, snapshot, snapshot_file
from ._kvm import lib as _kvm_lib
from .device_model import DEVICES, DeviceDescriptor
from .devices import (
    DEFAULT_OUTPUT_LIMIT,
    Console,
    DebugExit,
    Device,
    GuestExceptionPort,
    SerialConsole,
    check_output_limit,
)
from .errors import (
    ArgumentError,
    ArgumentTypeError,
    ClosedError,
    Error,
    KvmError,
    RegionOverlapError,
    VcpuIndexError,
)
from .backend import select_backend
from .kvm import Kvm, _as_list, struct_bytes
from .dirty_rate import DIRTY_PAGE_STATS
from .kvm_stats import CachedStats, StatsDescriptor, StatValue
from .memory import GuestMemory, parse_size
from .vcpu import RUN_LOOP_COUNTERS, RUN_LOOP_MEASURES, Vcpu

from .snapshot import Snapshot

if TYPE_CHECKING:  # annotations of the virtio, migration and control sections
    from . import migration, virtio
    from .control import ControlServer

#: Where KVM may put the three pages it needs for real mode on VMX without
#: unrestricted guest (the address QEMU uses), when guest RAM leaves it free.
TSS_ADDRESS = 0xFFFBD000

UART_PORT = _native.UART_PORT
DEBUGCON_PORT = _native.DEBUGCON_PORT
DEBUG_EXIT_PORT = _native.DEBUG_EXIT_PORT

Handler = Callable[[exits.Exit], Optional[int]]
PortRange = Union[int, range, Tuple[int, int]]


#: The ring ``Vm(dirty_ring=True)`` gets: 4096 entries, what the KVM API
#: documentation recommends at least.
DEFAULT_DIRTY_RING = 64 << 10


def dirty_ring_size(spec: Union[bool, int, str]) -> int:
    """The ring size in bytes ``Vm(dirty_ring=spec)`` asks for."""
    if spec is True:
        return DEFAULT_DIRTY_RING
    if isinstance(spec, (int, str)) and not isinstance(spec, bool):
        try:
            return parse_size(spec)
        except Error as e:
            raise ArgumentError(f"dirty_ring: {e}") from None
    raise ArgumentTypeError(f"dirty_ring must be False, True or a size in bytes "
                            f"(like 65536 or '64K'), not {spec!r}")


def _as_range(spec: PortRange, what: str, limit: int, space: str = "") -> Tuple[int, int]:
    """(start, length) from a port/address, a range, or a (start, length) pair,
    inside [0, limit) (``space`` names that span in the error)."""
    if isinstance(spec, bool):
        raise ArgumentTypeError(f"{what} must be an int, a range or (start, length), not {spec!r}")
    if isinstance(spec, int):
        start, length = spec, 1
    elif isinstance(spec, range):
        # Not len(): it overflows past 2**63 (a whole address space).
        if spec.step != 1 or spec.stop <= spec.start:
            raise ArgumentError(f"{what} range must be non-empty with step 1, not {spec!r}")
        start, length = spec.start, spec.stop - spec.start
    elif (isinstance(spec, tuple) and len(spec) == 2
          and all(isinstance(v, int) and not isinstance(v, bool) for v in spec)):
        start, length = spec
    else:
        raise ArgumentTypeError(f"{what} must be an int, a range or (start, length), not {spec!r}")
    if start < 0 or length <= 0 or start + length > limit:
        raise ArgumentError(f"{what} {start:#x}+{length:#x} is outside 0-{limit - 1:#x}{space}")
    return start, length


class Vm:
    """A virtual machine.

    ``memory`` is the size of guest RAM at guest-physical 0 (``"64M"``,
    ``1 << 20``...).  ``backend`` is the device path, or None to pick one
    (:func:`select_backend`).  Use it as a context manager, or call
    :meth:`close`; a forgotten VM is freed when it is garbage-collected.

    Native devices (no Python on their path): ``console``, a 16550 UART at
    0x3f8; ``debugcon``, QEMU's debug console at 0xe9; ``debug_exit``,
    QEMU's isa-debug-exit at ``debug_exit_port`` (None: none).
    With ``pc_devices`` (the default), also the standard PC devices of
    :mod:`pyvt.pc`: ``fw_cfg``, ``cmos``, ``pm_timer``, ``i8042`` (whose
    reset ends a run with :class:`pyvt.exits.Reset`) and ``post`` (port 0x80);
    without, those attributes are None.  ``devices`` maps each device's name
    to its handle (:mod:`pyvt.device_model` lists them all).
    ``output_limit`` is how many bytes of output ``console`` and ``debugcon``
    each keep (their last ones; None: all): see :class:`pyvt.devices.Console`.
    ``dirty_ring`` (False, True for 64 KiB, or a size like ``"256K"``: a
    power of two, 16 bytes an entry) makes KVM log the guest's writes in a
    ring per vCPU instead of a bitmap, from creation on: see
    :meth:`pyvt.memory.GuestMemory.dirty_pages` and :mod:`pyvt.dirty_pages`.
    """

    # The native devices, set from pyvt.device_model.DEVICES (None: absent).
    console: SerialConsole
    debugcon: Console
    debug_exit: Optional[DebugExit]
    guest_exceptions: GuestExceptionPort
    fw_cfg: Optional[pc.FwCfg]
    cmos: Optional[pc.Cmos]
    pm_timer: Optional[pc.PmTimer]
    acpi_pm1: Optional[pc.AcpiPm1]
    i8042: Optional[pc.I8042]
    post: Optional[pc.PostCode]

    def __init__(self, memory: Union[int, str] = "64M", backend=None, *,
                 debug_exit_port: Optional[int] = DEBUG_EXIT_PORT,
                 pc_devices: bool = True, output_limit: Optional[int] = DEFAULT_OUTPUT_LIMIT,
                 dirty_ring: Union[bool, int, str] = False,
                 _memory_source: Optional[int] = None):
        self._released = True  # nothing to free yet
        self._closed = True
        self.vcpus: Dict[int, Vcpu] = {}
        size = parse_size(memory)
        self.backend = select_backend(backend)
        self.kvm = Kvm.shared(self.backend)
        self.fd = self.kvm.create_vm()
        self._kvm_stats = CachedStats(self.fd, self.kvm, "VM", RUN_LOOP_COUNTERS)
        self._released = False
        self._closed = False
        self._lock = threading.Lock()
        # Held by a snapshot or restore for its whole length: run() waits
        # on it instead of failing while they hold the vCPUs' run locks.
        self._pause_lock = threading.Lock()
        self._claims: Dict[Tuple[int, int], Tuple[int, str]] = {}  # (space, start) -> (length, owner)
        self._devices: Dict[str, Device] = {}  # name -> handle, in DEVICES order
        self._max_vcpus: Optional[int] = None
        self._output_limit = output_limit
        for descriptor in DEVICES:  # a device the VM lacks is None
            setattr(self, descriptor.name, None)
        try:
            if dirty_ring is not False:  # before any vCPU or memory slot
                self.fd.enable_dirty_log_ring(dirty_ring_size(dirty_ring))
            if size <= TSS_ADDRESS and self.kvm.check_extension("KVM_CAP_SET_TSS_ADDR"):
                self.fd.set_tss_addr(TSS_ADDRESS)
            # _memory_source: a snapshot's memfd to map copy-on-write (clones).
            self.memory = GuestMemory(self.fd, size, self._max_physical_address(),
                                      copy_on_write_of=_memory_source)
            self.memory._io_claims = self._claims  # RAM stays clear of MMIO handlers
            self._machine = _native.Machine()
            self._coalescing = bool(self.kvm.check_extension("KVM_CAP_COALESCED_PIO"))
            check_output_limit(output_limit)
            port_options = {"debug_exit_port": debug_exit_port}
            for descriptor in DEVICES:
                if descriptor.pc and not pc_devices:
                    continue
                port = descriptor.port
                if descriptor.port_option is not None:
                    spec = port_options[descriptor.port_option]
                    if spec is None:
                        continue  # e.g. debug_exit_port=None: no isa-debug-exit
                    port, _ = _as_range(spec, descriptor.port_option, 0x10000)
                self._attach_device(descriptor, port)
        except BaseException:
            self.close()
            raise

    def _max_physical_address(self) -> int:
        """1 << MAXPHYADDR from the CPUID KVM supports (leaf 0x80000008)."""
        try:
            for entry in self.kvm.get_supported_cpuid():
                if entry.function == 0x80000008:
                    return 1 << (entry.eax & 0xFF)
        except KvmError:
            pass
        return 1 << 36  # the architectural minimum with PAE

    # -- native devices (pyvt.device_model) -----------------------------------

    def _attach_device(self, descriptor: DeviceDescriptor, port: int) -> Device:
        """Builds the device ``descriptor`` describes at ``port``, puts every
        range of it on the bus and claims them, and makes its handle
        ``vm.devices[name]`` and ``vm.<name>``."""
        native = descriptor.native(self._machine, port)
        ranges = native.ranges
        for space, start, length in ranges:
            self._check_range_free(space, start, length)
        if descriptor.coalesced and self._coalescing:
            # Writes to the first port (a console's data register) never
            # need the vCPU to stop: KVM queues them, from the guest's first
            # write on, and the run loop replays them in order (at creation
            # the zone would make a quick close wait ~15 ms: lazy_coalesce.h).
            native.coalesce_lazily(self.fd.fileno())
        native.attach()
        for space, start, length in ranges:
            self._claims[(space, start)] = (length, descriptor.name)
        device = descriptor.handle(self, native, descriptor.name)
        self._devices[descriptor.name] = device
        setattr(self, descriptor.name, device)
        device._start()
        return device

    def _detach_device(self, device: Device) -> None:
        """Takes ``device`` off the bus: its coalesced zone goes (after the
        writes queued there reach it), then every range, then the claims."""
        self._check_open()
        if not device.attached:
            return
        if device._native.coalescing is not None:
            self._sync_devices()  # the queued writes reach it before it goes
            device._native.stop_coalescing()
        ranges = device._native.ranges
        try:
            device._native.detach()
        finally:
            for space, start, _ in ranges:
                self._claims.pop((space, start), None)

    @property
    def devices(self) -> Mapping[str, Device]:
        """The native devices this VM has, ``{name: handle}`` (read-only):
        ``console``, ``debugcon``, ``debug_exit``, ``guest_exceptions`` (the
        port ring-3 vCPUs' exception stubs write) and the PC devices (see
        :mod:`pyvt.device_model`)."""
        return types.MappingProxyType(self._devices)

    def _device_exit(self, code: int, port: int, vcpu) -> exits.AnyExit:
        """The exit for a native device that stopped ``vcpu``'s run at ``port``."""
        for device in self._devices.values():
            if any(start <= port < start + length for start, length in device.ranges):
                return device.stop_exit(code, port, vcpu)
        return exits.Unhandled(-1, code, vcpu._rip())

    def _sync_devices(self) -> None:
        """Replays coalesced writes still queued in KVM's ring."""
        vcpu = next(iter(self.vcpus.values()), None)  # the ring is per VM: any will do
        if vcpu is not None:
            vcpu._drain()

    # -- lifecycle ---------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("this VM is closed")

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Frees everything: vCPUs, memory, fds.  Idempotent.  vCPUs running
        in other threads are stopped first and waited for; one whose run()
        is on this thread's stack (close from a handler) is freed when that
        run() returns."""
        if getattr(self, "_released", True):
            return
        self._released = True
        self._closed = True
        self._close_run_control()
        me = threading.get_ident()
        vcpus = list(self.vcpus.values())
        for vcpu in vcpus:
            vcpu.stop()
        for vcpu in vcpus:
            if vcpu._running_thread == me:
                vcpu._close_pending = True
                continue
            with vcpu._run_lock:  # waits for a run in another thread to return
                vcpu._close()
        if "_virtio_devices" in self.__dict__:  # their workers stop before the memory goes
            from .virtio import attach

            attach.close_all(self)
        machine = getattr(self, "_machine", None)
        if machine is not None:
            machine.close()
        for device in getattr(self, "_devices", {}).values():
            device._close()
        self._kvm_stats.close()
        self.fd.close()
        memory = getattr(self, "memory", None)
        if memory is not None:
            memory.close()

    def __enter__(self) -> "Vm":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        if self._closed:
            return "<Vm closed>"
        return (f"<Vm {self.memory.size >> 20} MiB on {self.backend}, "
                f"{len(self.vcpus)} vCPU(s)>")

    # -- vCPUs ---------------------------------------------------------------

    @property
    def max_vcpus(self) -> int:
        """How many vCPUs this backend allows (KVM_CAP_MAX_VCPUS)."""
        if self._max_vcpus is None:
            self._max_vcpus = (self.fd.check_extension("KVM_CAP_MAX_VCPUS")
                               or self.fd.check_extension("KVM_CAP_NR_VCPUS") or 1)
        return self._max_vcpus

    def vcpu(self, index: int = 0, mode: str = "real", ring: int = 0) -> Vcpu:
        """Creates vCPU ``index`` (``KVM_CREATE_VCPU``) in ``mode``: "real",
        "protected" or "long", ready to run flat code (see :mod:`pyvt.modes`
        for the reserved area the GDT and page tables use).

        ``ring=3`` (long mode) starts the vCPU at CPL 3 in the same flat
        address space, with port I/O allowed: on software-assisted KVM
        (PVM) ring-3 code runs natively while ring-0 code is emulated.  An
        exception ends ``run()`` with :class:`pyvt.exits.GuestException`
        (vector, error code, rip, cr2), and ``hlt`` with
        :class:`pyvt.exits.Hlt` as at CPL 0 (see :mod:`pyvt.guest_exceptions`)."""
        return self._new_vcpu(index, mode, ring=ring)

    def _new_vcpu(self, index: int, mode: str, setup: bool = True, ring: int = 0) -> Vcpu:
        """vcpu(); setup=False leaves CPUID and registers unset (clones)."""
        self._check_open()
        modes.check_mode(mode)
        modes.check_ring(ring, mode)
        if isinstance(index, bool) or not isinstance(index, int):
            raise VcpuIndexError(f"vCPU index must be an int, not {index!r}")
        limit = self.max_vcpus
        if not 0 <= index < limit:
            raise VcpuIndexError(f"vCPU index {index} is out of range: this backend allows 0-{limit - 1}")
        with self._lock:
            if index in self.vcpus:
                raise VcpuIndexError(f"vCPU {index} exists already: use vm.vcpus[{index}]")
            vcpu = Vcpu(self, index, mode, setup=setup, ring=ring)
            self.vcpus[index] = vcpu
            if self.fw_cfg is not None and self.fw_cfg.cpu_count < len(self.vcpus):
                self.fw_cfg.cpu_count = len(self.vcpus)
        return vcpu

    # -- I/O handlers --------------------------------------------------------

    def _check_range_free(self, space: int, start: int, length: int) -> None:
        for (s, base), (size, owner) in self._claims.items():
            if s == space and base < start + length and start < base + size:
                raise RegionOverlapError(
                    f"{start:#x}-{start + length - 1:#x} overlaps {base:#x}-{base + size - 1:#x}, "
                    f"which {owner} holds" + ("; detach it first (e.g. vm.console.detach())"
                                              if not owner.startswith("handler") else ""))

    def _add_handler(self, space: int, start: int, length: int, handler: Handler,
                     what: str) -> None:
        self._check_open()
        if not callable(handler):
            raise ArgumentTypeError(f"handler must be callable, not {handler!r}")
        self._check_range_free(space, start, length)
        self._machine.add_handler(space, start, length, handler)
        # The name only, not the handler: removing it must free it.
        name = getattr(handler, "__name__", type(handler).__name__)
        self._claims[(space, start)] = (length, f"handler {name}")

    def on_io(self, ports: PortRange, handler: Handler) -> None:
        """Calls ``handler(exit)`` for guest port I/O on ``ports`` (a port, a
        ``range``, or ``(start, count)``).  ``exit`` is an :class:`pyvt.exits.Io`
        for one element; for an ``in`` the handler returns the value read."""
        start, length = _as_range(ports, "port", 0x10000)
        self._add_handler(_native.SPACE_PIO, start, length, handler, "port")

    def on_mmio(self, addresses: PortRange, handler: Handler) -> None:
        """Calls ``handler(exit)`` for guest accesses to ``addresses`` (which
        must not be RAM, and lie in the guest's physical address space); for
        a read the handler returns the value."""
        self._check_open()
        start, length = _as_range(addresses, "MMIO address", self._max_physical_address(),
                                  " (the guest's physical address space)")
        for region in self.memory.regions:
            if start < region.end and region.gpa < start + length and not region.readonly:
                raise RegionOverlapError(
                    f"MMIO range {start:#x}-{start + length - 1:#x} overlaps guest RAM {region!r}: "
                    "the guest would never exit there")
        self._add_handler(_native.SPACE_MMIO, start, length, handler, "MMIO")

    def _remove_handler(self, space: int, start: int) -> None:
        self._check_open()
        claim = self._claims.get((space, start))
        if claim is None or not claim[1].startswith("handler"):
            raise ArgumentError(f"no handler starts at {start:#x}")
        self._machine.remove(space, start)
        del self._claims[(space, start)]

    def off_io(self, ports: PortRange) -> None:
        """Removes the port handler whose range starts at ``ports``."""
        self._remove_handler(_native.SPACE_PIO, _as_range(ports, "port", 0x10000)[0])

    def off_mmio(self, addresses: PortRange) -> None:
        """Removes the MMIO handler whose range starts at ``addresses``."""
        self._remove_handler(_native.SPACE_MMIO, _as_range(addresses, "MMIO address", 1 << 64)[0])

    # -- booting kernels -----------------------------------------------------

    def boot(self, kernel, *, cmdline: Union[str, bytes] = "", initrd=None, modules=(),
             smp: int = 1, irqchip: bool = True, acpi: bool = True,
             format: Optional[str] = None, load_address: int = 0x100000,
             flat_mode: str = "long", strict_io: bool = False,
             kernel_name: Union[str, bytes, None] = None):
        """Loads ``kernel`` (bytes or a path) and creates ``smp`` vCPUs ready
        to run it; then call :meth:`run`.  Returns the :class:`pyvt.loaders.Image`.

        ``format`` (default: detected) is ``multiboot`` (``cmdline``,
        ``initrd`` as module 0, more ``modules`` as ``(data, string)``), ``elf``
        or ``flat`` (at ``load_address``, in ``flat_mode``).  ``cmdline`` and
        the strings are str or bytes: a str is encoded as :func:`os.fsencode`
        does, so a file name's undecodable bytes reach the guest unchanged.
        A kernel, initrd or module file larger than guest RAM is refused
        before it is read.  With ``irqchip``
        the VM gets KVM's LAPICs, IOAPIC, PIC (``KVM_CREATE_IRQCHIP``) and PIT;
        application processors wait for INIT/SIPI, and ``hlt`` waits in the
        kernel for an interrupt as on a PC (a guest ends with a debug-exit,
        a reset or a failure).  ``acpi`` writes the tables
        of :mod:`pyvt.acpi`.  Unclaimed ports and addresses answer like a PC
        (reads all ones, writes dropped) unless ``strict_io``.  Raises
        :class:`pyvt.loaders.LoaderError` for a kernel that cannot be loaded.
        """
        from . import boot as _boot

        return _boot.boot(self, kernel, cmdline=cmdline, initrd=initrd, modules=modules,
                          smp=smp, irqchip=irqchip, acpi=acpi, format=format,
                          load_address=load_address, flat_mode=flat_mode,
                          strict_io=strict_io, kernel_name=kernel_name)

    def run(self, timeout: Optional[float] = None, trace_io=None) -> exits.Exit:
        """Runs every vCPU, one thread each, until one of them stops (a
        debug-exit, a reset, a failure, or ``timeout`` seconds); stops the
        others and returns that exit.  ``trace_io`` (True for stderr, or a
        file) logs each access nothing claims, and still answers it like a PC."""
        from . import boot as _boot

        return _boot.run(self, timeout, trace_io)

    # -- snapshots -------------------------------------------------------------

    def snapshot(self) -> "Snapshot":
        """Everything needed to resume exactly here: memory, every vCPU's
        state, the irqchip and PIT when present, the native devices' state
        (see :mod:`pyvt.snapshot`).  No vCPU may be running."""
        return snapshot.take(self)

    def restore(self, snap: "Snapshot", user_mode_only: bool = False) -> None:
        """Puts this VM back to ``snap`` in place: afterwards its memory and
        every vCPU's and device's state are exactly ``snap``'s, whatever
        happened since (later snapshots and restores, host writes, read-only
        regions included) and wherever ``snap`` comes from (this VM, another
        of the same shape, a clone's parent, a file).  Copies back only the
        pages written since ``snap`` when this VM knows them (the guest's
        through KVM's dirty log, the host's through ``vm.memory.write``; not
        writes through ``vm.memory.view``), and compares pages otherwise
        (see :mod:`pyvt.snapshot`).

        ``user_mode_only=True`` makes it faster where the caller can promise
        that since each vCPU's state was last restored from ``snap`` (or
        saved into it), the vCPUs ran CPL-3 code only: no exception,
        interrupt or system call reached CPL 0 (ring-3 vCPUs whose guest
        returns normally, as :class:`pyvt.Sandbox` calls with
        ``fast_reset=True``).  Then only what CPL-3 code can change is
        written (general and segment registers, the XSAVE/FPU state,
        events), and the TSC and KVM clock keep running instead of going
        back.  Without the promise kept, the state after it is undefined;
        a vCPU that does not hold ``snap``'s state yet is restored in full
        (see :meth:`pyvt.Vcpu.restore_state`)."""
        snapshot.restore(self, snap, user_mode_only)

    @classmethod
    def from_snapshot(cls, snap: "Snapshot", backend=None) -> "Vm":
        """A new VM in ``snap``'s state whose memory maps the snapshot's
        copy-on-write: clones share every page none of them writes."""
        return snapshot.clone(snap, cls, backend=backend)

    # -- interrupts, MSI and GSI routing, translation, clocks, nested state, sregs2 ---

    def signal_msi(self, address: int, data: int) -> int:
        """Sends one MSI message (``KVM_SIGNAL_MSI``) to the in-kernel LAPICs,
        as a PCI device would: ``address`` 0xfee00000 | destination APIC ID
        << 12, ``data`` the vector (fixed delivery, edge).  Returns how many
        LAPICs accepted it (0: blocked, e.g. the guest has not enabled its
        LAPIC).  Needs the in-kernel irqchip (``vm.fd.create_irqchip()``
        before the vCPUs)."""
        self._check_open()
        self._require_irqchip("an MSI")
        return self.fd.signal_msi(address, data)

    @property
    def gsi_routing(self) -> tuple:
        """The GSI routing table last set here (``()`` until then: the kernel's
        default, :func:`pyvt.gsi_routes.irqchip_routes`).  Assign a list of
        :class:`pyvt.gsi_routes.IrqchipRoute` / :class:`~pyvt.gsi_routes.MsiRoute`
        to replace the whole table (``KVM_SET_GSI_ROUTING``); then ``irq_line``
        or an ``irqfd`` on an MSI route's GSI sends its message."""
        self._check_open()
        return getattr(self, "_gsi_routes", ())

    @gsi_routing.setter
    def gsi_routing(self, routes) -> None:
        self._check_open()
        self._require_irqchip("GSI routing")
        routes = tuple(_as_list(routes, "GSI routes", "IrqchipRoute/MsiRoute"))
        self.fd.set_gsi_routing(routes)
        self._gsi_routes = routes

    def _require_irqchip(self, what: str) -> None:
        if not self.fd.has_irqchip:
            raise Error(f"{what} needs the in-kernel irqchip: call vm.fd.create_irqchip() "
                        "before creating the vCPUs")

    # -- the dirty ring --------------------------------------------------------

    @property
    def dirty_ring(self) -> int:
        """The size in bytes of each vCPU's dirty ring, or 0 (the VM logs
        writes in a bitmap): see ``Vm(dirty_ring=...)``."""
        self._check_open()
        return self.fd.dirty_ring_size

    # -- binary statistics -----------------------------------------------------

    @property
    def stats(self) -> Dict[str, StatValue]:
        """VM-wide counters, ``{name: value}``: KVM's VM statistics
        (``remote_tlb_flush``, ``pages_4k``, ``max_mmu_rmap_size``... where
        the backend has KVM_CAP_BINARY_STATS_FD; not on pyvt.ko) merged with
        pyvt's run-loop counters summed over the vCPUs (``kvm_exits``,
        ``native_exits``, ``coalesced_writes``, ``guest_time_ns``,
        ``exits_by_reason``...: see :attr:`pyvt.Vcpu.stats`), and the pages
        the guest dirtied as KVM's dirty log reported them: ``dirty_pages``
        (in all) and ``dirty_pages_per_s`` (at the last harvest; both stay
        0 while the VM does not log its writes, see :mod:`pyvt.dirty_rate`).
        Values are ints, lists of ints for histograms, a dict for
        ``exits_by_reason``; units and scales are in :attr:`stats_descriptors`.  Per-vCPU statistics (``exits``...) are
        in each ``vcpu.stats``.  The stats fd is opened by the first read
        and closed with the VM."""
        self._check_open()
        values = self._kvm_stats.read()
        totals: Dict[str, int] = dict.fromkeys((*RUN_LOOP_COUNTERS, "guest_time_ns"), 0)
        by_reason: Dict[str, int] = {}
        for vcpu in list(self.vcpus.values()):
            for name, value in vcpu._run_loop_stats().items():
                if isinstance(value, dict):
                    for reason, count in value.items():
                        by_reason[reason] = by_reason.get(reason, 0) + count
                elif isinstance(value, int):
                    totals[name] = totals.get(name, 0) + value
        values.update(totals)
        values["exits_by_reason"] = by_reason
        values["dirty_pages"] = self.memory.dirty_rate.total
        values["dirty_pages_per_s"] = self.memory.dirty_rate.per_second()
        return values

    @property
    def stats_descriptors(self) -> Dict[str, StatsDescriptor]:
        """What each key of :attr:`stats` is, as
        :attr:`pyvt.Vcpu.stats_descriptors` says for a vCPU's: KVM's VM
        statistics are mostly cumulative counts; ``pages_4k`` and the like
        are instant values, ``max_mmu_rmap_size`` and the like peaks."""
        self._check_open()
        descriptors = self._kvm_stats.descriptors()
        descriptors.update(RUN_LOOP_MEASURES)
        descriptors.update(DIRTY_PAGE_STATS)
        return descriptors

    # -- MSR filters and user-space MSR exits ----------------------------------

    def on_msr(self, msrs: PortRange, handler: Handler) -> None:
        """Calls ``handler(exit)`` for the guest's ``rdmsr``/``wrmsr`` of
        ``msrs`` (an MSR index, a ``range``, or ``(start, count)``), instead
        of KVM.  ``exit`` is a :class:`pyvt.exits.Msr`; for a read the
        handler returns the 64-bit value (EDX:EAX), for a write it gets
        ``exit.value``.  Raising :class:`pyvt.MsrFault` refuses the access:
        the guest takes #GP.  Any other exception propagates out of
        ``run()`` as from ``on_io`` handlers (a read runs again next time,
        a write is not made twice).

        The first handler enables ``KVM_CAP_X86_USER_SPACE_MSR`` (exits for
        ``KVM_MSR_EXIT_REASON_FILTER`` only: this replaces a reason mask set
        before through ``vm.fd.enable_cap``); each on_msr/off_msr installs an MSR
        filter that sends exactly the handled MSRs to user space
        (:mod:`pyvt.msr_filter`; it replaces one set with
        ``vm.fd.x86_set_msr_filter``).  KVM's filter holds 16 ranges of
        12288 MSRs, which bounds how scattered the handled MSRs may be; the
        x2APIC MSRs (0x800-0x8ff) cannot be filtered."""
        self._check_open()
        start, length = _as_range(msrs, "MSR index", 1 << 32)
        msr_filter.check_filterable(start, length)
        self._check_range_free(_native.SPACE_MSR, start, length)
        ranges = msr_filter.filter_ranges(self._msr_spans() + [(start, length)])
        self._enable_msr_exits()
        # On the bus before KVM sends the MSR: a vCPU may exit to it at once.
        self._add_handler(_native.SPACE_MSR, start, length, handler, "MSR")
        try:
            self.fd.x86_set_msr_filter(ranges)
        except BaseException:
            self._remove_handler(_native.SPACE_MSR, start)
            raise

    def off_msr(self, msrs: PortRange) -> None:
        """Removes the MSR handler whose range starts at ``msrs``; KVM
        handles those MSRs again (with no handler left, the filter goes)."""
        self._check_open()
        start = _as_range(msrs, "MSR index", 1 << 32)[0]
        claim = self._claims.get((_native.SPACE_MSR, start))
        if claim is None:
            raise ArgumentError(f"no MSR handler starts at {start:#x}")
        # KVM stops sending the MSRs before their handler goes.
        self.fd.x86_set_msr_filter(msr_filter.filter_ranges(
            span for span in self._msr_spans() if span[0] != start))
        self._remove_handler(_native.SPACE_MSR, start)

    def _msr_spans(self) -> List[Tuple[int, int]]:
        """(start, length) of every MSR handler."""
        return [(start, length) for (space, start), (length, _) in self._claims.items()
                if space == _native.SPACE_MSR]

    def _enable_msr_exits(self) -> None:
        """KVM_CAP_X86_USER_SPACE_MSR for filtered MSRs, once per VM."""
        if getattr(self, "_msr_exits_enabled", False):
            return
        cap = "KVM_CAP_X86_USER_SPACE_MSR"
        for needed in (cap, "KVM_CAP_X86_MSR_FILTER"):
            if not self.fd.check_extension(needed):
                raise KvmError("KVM_CHECK_EXTENSION", errno.ENOTSUP,
                               f"{self.backend} lacks {needed}, which vm.on_msr needs")
        self.fd.enable_cap(cap, _kvm_lib.KVM_MSR_EXIT_REASON_FILTER)
        self._msr_exits_enabled = True

    # -- VM-wide state: KVM clock, irqchip, PIT --

    def save_clock(self) -> Optional[int]:
        """The guests' KVM clock (kvmclock) in ns, ``KVM_GET_CLOCK``; None
        where the backend lacks KVM_CAP_ADJUST_CLOCK."""
        self._check_open()
        if not self.kvm.check_extension("KVM_CAP_ADJUST_CLOCK"):
            return None
        return self.fd.get_clock().clock

    def restore_clock(self, ns: int) -> None:
        """Sets the KVM clock back to ``ns`` (``KVM_SET_CLOCK``, without
        KVM_CLOCK_REALTIME): the guests' kvmclock time continues from the
        instant it was saved, as their TSCs do (see
        :mod:`pyvt.vcpu_state`), however long ago that was.  KVM makes every
        vCPU refresh its kvmclock page before it next runs."""
        self._check_open()
        self.fd.set_clock(ns)

    def save_irqchip(self) -> Optional[List[bytes]]:
        """The in-kernel PIC master, PIC slave and IOAPIC states
        (``KVM_GET_IRQCHIP``, as bytes, in :data:`pyvt.snapshot_file.IRQCHIPS`
        order); None without the in-kernel irqchip."""
        self._check_open()
        if not self.fd.has_irqchip:
            return None
        return [struct_bytes(self.fd.get_irqchip(getattr(_kvm_lib, name)))
                for name in snapshot_file.IRQCHIPS]

    def restore_irqchip(self, chips: List[bytes]) -> None:
        """Puts back what :meth:`save_irqchip` returned (``KVM_SET_IRQCHIP``)."""
        self._check_open()
        for chip in chips:
            self.fd.set_irqchip(chip)

    def save_pit(self) -> Optional[bytes]:
        """The in-kernel PIT's state (``KVM_GET_PIT2``, as bytes); None
        without it."""
        self._check_open()
        return struct_bytes(self.fd.get_pit2()) if self.fd.has_pit else None

    def restore_pit(self, state: bytes) -> None:
        """Puts back what :meth:`save_pit` returned (``KVM_SET_PIT2``)."""
        self._check_open()
        self.fd.set_pit2(state)

    # -- debugging (pyvt.debugging, pyvt.gdbstub) -------------------------------

    _debugger: Optional["debugging.Debugger"] = None

    @property
    def debugger(self) -> "debugging.Debugger":
        """This VM's :class:`pyvt.debugging.Debugger`: breakpoints,
        watchpoints, and ``resume(cpu)``, which runs a vCPU on past the
        breakpoint it stopped at (the first use probes the backend once)."""
        return debugging.debugger(self)

    @property
    def breakpoints(self) -> "debugging.Breakpoints":
        """``vm.breakpoints.add(address, kind="sw"|"hw")`` / ``.remove(address)``:
        see :class:`pyvt.debugging.Breakpoints`."""
        return self.debugger.breakpoints

    @property
    def watchpoints(self) -> "debugging.Watchpoints":
        """``vm.watchpoints.add(address, length, access="w"|"rw")`` / ``.remove(address)``:
        see :class:`pyvt.debugging.Watchpoints`."""
        return self.debugger.watchpoints

    def gdb_server(self, address="localhost:1234", wait: bool = True):
        """Serves this VM to gdb (``target remote HOST:PORT``) on ``address``
        (``"[HOST:]PORT"``, a port number, or ``(host, port)``), the vCPUs
        stopped until gdb continues them.  ``wait=True`` serves until gdb
        detaches or the guest ends and returns the
        :class:`pyvt.gdbstub.GdbServer` (its ``final_exit`` is how the guest
        ended, if it did); ``wait=False`` serves from a daemon thread and
        returns at once, listening."""
        from . import gdbstub

        server = gdbstub.GdbServer(self, address)
        if wait:
            server.serve()
        else:
            server.start()
        return server

    # -- PCI (pyvt.pci) --------------------------------------------------------

    @property
    def pci(self):  # -> pyvt.pci.PciBus (imported on first use)
        """PCI bus 0 (:class:`pyvt.pci.PciBus`), made on first use: it claims
        ports 0xcf8-0xcff and the ECAM window at :data:`pyvt.pci.ECAM_BASE`
        and holds the host bridge at 00.0; ``vm.pci.add(device)`` adds a
        :class:`pyvt.pci.PciDevice`.  The ACPI tables describe it."""
        self._check_open()
        bus = getattr(self, "_pci", None)
        if bus is None:
            from . import pci

            with self._lock:
                bus = getattr(self, "_pci", None)
                if bus is None:
                    bus = self._pci = pci.PciBus(self)
            from . import acpi

            acpi.pci_bus_created(self)
        return bus

    # -- virtio (pyvt.virtio) ----------------------------------------------------

    def add_virtio(self, device: "virtio.VirtioDevice", slot: Optional[int] = None) -> "virtio.VirtioPciDevice":
        """Puts ``device`` (a :class:`pyvt.virtio.VirtioDevice`, e.g. one
        written in Python) on ``vm.pci`` as a virtio 1.x PCI function, in
        ``slot`` (default: the first free one).  Returns its transport
        (:class:`pyvt.virtio.VirtioPciDevice`)."""
        from .virtio import attach

        return attach.add_virtio(self, device, slot)

    def add_disk(self, path, readonly: bool = False, *, serial: Optional[str] = None) -> "virtio.BlockDevice":
        """A virtio-blk disk on the raw image ``path`` (the first is Linux's
        /dev/vda); ``readonly`` refuses the guest's writes.  A missing or
        unopenable image is a :class:`pyvt.DiskImageError`."""
        from .virtio import BlockDevice

        device = BlockDevice(path, readonly, serial=serial)
        self.add_virtio(device)
        return device

    def add_net(self, tap: str, mac: Optional[str] = None) -> "virtio.NetDevice":
        """A virtio-net NIC on the existing host tap device ``tap`` (a
        missing tap is a :class:`pyvt.TapError`), MAC ``mac`` (default random)."""
        from .virtio import NetDevice

        device = NetDevice(tap, mac)
        self.add_virtio(device)
        return device

    def add_rng(self) -> "virtio.RngDevice":
        """A virtio entropy device (Linux: /dev/hwrng), fed by the host's getrandom()."""
        from .virtio import RngDevice

        device = RngDevice()
        self.add_virtio(device)
        return device

    def add_console(self, input=None, output=None) -> "virtio.ConsoleDevice":
        """A virtio console (Linux: hvc0) between the host's ``input`` and
        ``output`` (file descriptors or files; None: stdin, stdout)."""
        from .virtio import ConsoleDevice

        device = ConsoleDevice(input, output)
        self.add_virtio(device)
        return device

    @property
    def virtio_devices(self) -> List["virtio.VirtioPciDevice"]:
        """The virtio devices' transports, in the order they were added."""
        from .virtio import attach

        return list(attach.devices(self))

    # -- run control, control socket (issue 17: pyvt.run_control, pyvt.control) --

    def pause(self, timeout: Optional[float] = 10.0) -> None:
        """Stops every vCPU that :meth:`run` (in another thread) runs and
        returns once all are parked outside the guest, their pending writes
        completed: the caller may then take :meth:`snapshot`,
        ``cpu.save_state()``, :meth:`save_clock`...  Idempotent.  With no
        run active, marks the VM paused: a run() started later starts
        parked.  :meth:`resume` lets the guest go on exactly where it was.
        Raises :class:`pyvt.RunControlError` if a vCPU does not stop within
        ``timeout`` seconds (None: no limit); the VM then runs on."""
        from . import run_control

        self._check_open()
        run_control.of(self).pause(timeout)

    def resume(self) -> None:
        """Undoes :meth:`pause`: the parked vCPUs go on where they were.
        Does nothing if the VM is not paused."""
        from . import run_control

        self._check_open()
        run_control.of(self).resume()

    def end_run(self, exit: exits.Exit) -> None:
        """Makes the active :meth:`run` stop its vCPUs and return ``exit``
        (a :mod:`pyvt.exits` value), paused or not; returns once they are
        stopped.  With no run active, the next run() returns ``exit`` at once
        without running the guest.  A pause stays in force: a later run()
        starts parked until :meth:`resume`.  May be called from a handler
        on a vCPU's own thread."""
        from . import run_control

        self._check_open()
        run_control.of(self).end_run(exit)

    @property
    def status(self) -> str:
        """``"created"`` (never run), ``"running"``, ``"paused"``,
        ``"shutdown"`` (the last run() returned), or a migration's
        ``"inmigrate"``/``"migrated"``."""
        from . import run_control

        return run_control.of(self).status

    def subscribe(self, callback) -> Callable[[], None]:
        """Calls ``callback(name, data)`` (from any thread) for each event:
        ``STOP``, ``RESUME``, ``SHUTDOWN`` (``data`` says how the run
        ended), ``MIGRATION``.  Returns the function that unsubscribes it.
        A callback that raises is reported on stderr once; the VM goes on."""
        from . import run_control

        return run_control.of(self).subscribe(callback)

    def _emit_event(self, name: str, data: Optional[dict] = None) -> None:
        from . import run_control

        run_control.of(self).emit(name, data)

    def _set_status(self, status: str) -> None:
        from . import run_control

        run_control.of(self).set_status(status)

    def serve_control(self, path, name: Optional[str] = None) -> "ControlServer":
        """Serves this VM's control socket at ``path`` (a Unix socket, mode
        0600, one JSON object per line: ``query-status``, ``query-stats``,
        ``stop``, ``cont``, ``snapshot``, ``migrate``..., see
        :mod:`pyvt.control`) from a thread of its own, and registers the VM
        (as ``name``) where ``pyvt top`` looks.  Returns the
        :class:`pyvt.control.ControlServer`; ``close()`` it, or it closes
        with the VM.  Raises :class:`pyvt.ControlError` if ``path`` exists
        and is not a stale socket."""
        from . import control

        return control.serve(self, path, name)

    def _close_run_control(self) -> None:
        """From close(): parked vCPUs leave their run, control sockets close."""
        control = self.__dict__.get("_run_control_state")
        if control is not None:
            control.close()
        for server in list(self.__dict__.get("_control_servers", ())):
            server.close()

    # -- migration (pyvt.migration, pyvt.state_hooks) --

    _migration = None

    def add_state(self, name: str, save, load) -> None:
        """Registers state kept in Python (a handler's registers, say) that
        snapshots and live migration carry: ``save()`` returns it (dicts
        with str keys, lists, ints, strs, bytes, None), ``load(state)``
        puts it back.  See :mod:`pyvt.state_hooks`."""
        from . import state_hooks

        state_hooks.add(self, name, save, load)

    def remove_state(self, name: str) -> None:
        """Removes the state hook ``name``."""
        from . import state_hooks

        state_hooks.remove(self, name)

    def start_migration(self, uri: str, downtime_ms: float = 30) -> "migration.Migration":
        """Starts moving this running VM to ``uri`` (``tcp:HOST:PORT`` or
        ``unix:PATH``, where a ``Vm.incoming``/``pyvt incoming`` listens) in
        a thread of its own and returns the :class:`pyvt.migration.Migration`
        at once.  A VM with parts that cannot move is refused here
        (:class:`pyvt.MigrationError`), before anything is sent.  On success
        the active ``run()`` returns :class:`pyvt.exits.Migrated`; on any
        failure the VM runs on unchanged.  See :mod:`pyvt.migration.source`."""
        from . import migration

        current = self._migration
        if current is not None and not current.done:
            raise migration.MigrationError(f"a migration to {current.uri} is under way: "
                                           "cancel it or wait for it first")
        self._migration = migration.Migration(self, uri, downtime_ms)
        return self._migration

    def migrate(self, uri: str, downtime_ms: float = 30) -> "migration.MigrationResult":
        """:meth:`start_migration` and wait for its end: the
        :class:`pyvt.migration.MigrationResult` (status "completed",
        "failed" or "cancelled", ``downtime_ms``, ``total_ms``,
        ``transferred_bytes``, ``rounds``...)."""
        return self.start_migration(uri, downtime_ms).wait()

    @property
    def migration(self) -> Optional["migration.Migration"]:
        """The current or last migration of this VM, or None."""
        return self._migration

    @classmethod
    def incoming(cls, uri, setup: Optional[Callable[["Vm"], None]] = None, backend=None,
                 timeout: Optional[float] = None) -> "Vm":
        """Waits on ``uri`` (``tcp:HOST:PORT``, ``unix:PATH``, or a
        :class:`pyvt.migration.Listener` already listening) for one VM that
        ``vm.migrate`` sends, builds it and returns it ready for
        ``vm.run()``.  ``setup(vm)`` runs before the state is loaded: it
        registers the Python handlers (``on_io``...) and state hooks
        (``add_state``) the source VM had, which must match.  Raises
        :class:`pyvt.MigrationError` (and keeps nothing) if the VM does not
        arrive whole.  See :mod:`pyvt.migration.destination`."""
        from . import migration

        return migration.incoming(uri, setup=setup, backend=backend, vm_class=cls,
                                  timeout=timeout)
