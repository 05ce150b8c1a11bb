"""Snapshots: everything needed to put a VM back exactly where it was.

``snap = vm.snapshot()`` copies guest memory and every vCPU's state (general,
special and FPU registers, the XSAVE area (AVX and later state), XCRs, MSRs,
events, MP state, debug registers, the LAPIC and the in-kernel irqchip and
PIT when present) and the native devices' state.  ``vm.restore(snap)`` puts
the same VM back in place.  ``pyvt.Vm.from_snapshot(snap)`` makes a new VM
whose memory is a copy-on-write mapping of the snapshot's: N clones cost only
the pages each one writes.  ``snap.save(path)`` / ``Snapshot.load(path)``
keep a snapshot in a versioned, checksummed file (:mod:`pyvt.snapshot_file`).

The restore rule: ``vm.restore(s)`` leaves the VM with exactly ``s``'s memory
and vCPU and device state, for any snapshot ``s`` of a VM of the same shape
(memory regions, vCPUs, irqchip), whatever happened since: later snapshots,
other restores (``restore(a)``, ``restore(b)``, ``restore(a)`` again), host
writes (``vm.memory.write``, read-only regions included), a snapshot of
another VM, of the clone's parent, or loaded from a file.  The one thing it
cannot see is a write through the raw ``vm.memory.view`` memoryview (or
another mapping of guest memory) into a VM that already has snapshots: make
such writes with ``vm.memory.write``.

Restores are fast because a VM knows how its memory relates to the
snapshots taken from it or restored into it (:mod:`pyvt.memory`'s baselines,
fed by KVM's dirty log and ``vm.memory.write``): it copies back only the
pages written since.  A clone knows which pages it wrote from its own
mapping.  For a snapshot it has no baseline for, it compares the pages
either side may hold data in.  Snapshot memory is sparse: zero pages and
pages nobody touched cost nothing (:mod:`pyvt.snapshot_memory`).

The snapshot's memory lives in memfds owned by the snapshot (one file
descriptor per memory region); close it (or let the GC do it) to free them.
Clones keep what they map alive on their own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from . import _native, device_model, snapshot_file, snapshot_memory
from ._kvm import ffi, lib
from .errors import Error, SnapshotError, SnapshotFileError, SnapshotFileNotFound
from .kvm import _get_msrs, _msrs_struct, caps
from .snapshot_file import FORMAT_VERSION, IRQCHIPS, MAGIC, STRUCTS
from .snapshot_memory import PAGE_SIZE, RegionImage

__all__ = ["Snapshot", "VcpuImage", "RegionImage", "SnapshotError", "SnapshotFileError",
           "SnapshotFileNotFound", "FORMAT_VERSION", "MAGIC", "STRUCTS", "PAGE_SIZE",
           "check_cpuid"]

#: CPUID feature words a guest may have used: (leaf, subleaf, register).
FEATURE_WORDS = ((1, 0, "ecx"), (1, 0, "edx"), (7, 0, "ebx"), (7, 0, "ecx"), (7, 0, "edx"),
                 (0x80000001, 0, "ecx"), (0x80000001, 0, "edx"))


@dataclass
class VcpuImage:
    """One vCPU's architectural state, as the kernel structs' bytes."""

    index: int
    mode: str
    regs: bytes
    sregs: bytes
    fpu: bytes
    events: Optional[bytes]  # None where the backend lacks the ioctl (pyvt.ko)
    debugregs: Optional[bytes]
    mp_state: Optional[int]
    cpuid: bytes
    msrs: Dict[int, int] = field(default_factory=dict)
    xcrs: Optional[bytes] = None
    lapic: Optional[bytes] = None
    #: KVM_GET_XSAVE2 (or KVM_GET_XSAVE): x87, SSE, AVX and later state.
    xsave: Optional[bytes] = None
    #: The KVM_SET_MSRS block last built from ``msrs`` (see _set_msrs).
    _msr_block: Any = field(default=None, init=False, repr=False, compare=False)


@dataclass
class Snapshot:
    """A VM frozen in time.  Made by :meth:`pyvt.Vm.snapshot` or :meth:`load`."""

    backend: str
    regions: List[RegionImage]
    vcpus: List[VcpuImage]
    #: Each native device's state, ``{name: device.save_state()}``: the
    #: consoles' registers and output, fw_cfg (items, files, read position),
    #: CMOS, i8042, POST code (the PC devices absent for pc_devices=False).
    devices: Dict[str, Any]
    irqchip: Optional[List[bytes]] = None
    pit: Optional[bytes] = None
    debug_exit_port: Optional[int] = _native.DEBUG_EXIT_PORT

    @property
    def pc_devices(self) -> bool:
        """Whether the VM had the PC devices (``Vm(pc_devices=...)``)."""
        return any(device_model.by_name(name).pc for name in self.devices)

    @property
    def memory_size(self) -> int:
        return self.regions[0].size

    @property
    def closed(self) -> bool:
        return any(region.closed for region in self.regions)

    def __repr__(self) -> str:
        state = " closed" if self.closed else ""
        return (f"<Snapshot{state} {self.memory_size >> 20} MiB, {len(self.regions)} region(s), "
                f"{len(self.vcpus)} vCPU(s)>")

    def close(self) -> None:
        """Frees the snapshot's memory (clones keep their own mappings)."""
        for region in self.regions:
            region.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def save(self, path) -> None:
        """Writes the snapshot to ``path`` (see :mod:`pyvt.snapshot_file`).
        Raises :class:`SnapshotError` (a :class:`SnapshotFileError`, also an
        OSError, when the file system refuses) and leaves nothing behind
        when it fails."""
        snapshot_file.save(self, path)

    @classmethod
    def load(cls, path, backend=None) -> "Snapshot":
        """Reads a snapshot file, checking its format version, checksum and
        every field of its header, and that this host's KVM (``backend``,
        default: what pyvt picks) offers every CPUID feature the snapshot's
        vCPUs were shown; clones of it use that device.  Raises
        :class:`SnapshotError` (:class:`SnapshotFileNotFound`, also a
        FileNotFoundError, for a missing file)."""
        from .kvm import Kvm
        from .vm import select_backend

        snap = snapshot_file.load(path)
        try:
            kvm = Kvm.shared(select_backend(backend))
            check_cpuid(snap, kvm)
            snap.backend = kvm.path
        except BaseException:
            snap.close()
            raise
        return snap


def _features(cpuid_table: bytes) -> Dict[Tuple[int, int, str], int]:
    table = ffi.from_buffer("struct kvm_cpuid2 *", cpuid_table)
    out = {}
    for i in range(table.nent):
        e = table.entries[i]
        for leaf, sub, reg in FEATURE_WORDS:
            if e.function == leaf and e.index == sub:
                out[(leaf, sub, reg)] = getattr(e, reg)
    return out


_HOST_FEATURES: Dict[str, Dict[Tuple[int, int, str], int]] = {}


def _host_features(kvm) -> Dict[Tuple[int, int, str], int]:
    """The CPUID features a vCPU on this device ends up with: the supported
    table as KVM_SET_CPUID2 adjusts it (some KVMs, PVM among them, add what
    the CPU runs natively), read back from a throwaway vCPU."""
    cached = _HOST_FEATURES.get(kvm.path)
    if cached is None:
        with kvm.create_vm() as vm_fd, vm_fd.create_vcpu(0) as vcpu_fd:
            vcpu_fd.set_cpuid2_table(kvm.supported_cpuid_table())
            cached = _HOST_FEATURES[kvm.path] = _features(_cpuid_bytes(vcpu_fd))
    return cached


def check_cpuid(snap: Snapshot, kvm) -> None:
    """Refuses a snapshot whose vCPUs were shown CPUID features this host's
    KVM does not offer: the guest may be using them."""
    host = _host_features(kvm)
    for vcpu in snap.vcpus:
        for word, bits in _features(vcpu.cpuid).items():
            missing = bits & ~host.get(word, 0)
            # OSXSAVE follows the guest's CR4 and the APIC bit its APIC_BASE:
            # state, not features a host could lack.
            if word == (1, 0, "ecx"):
                missing &= ~(1 << 27)
            if word == (1, 0, "edx"):
                missing &= ~(1 << 9)
            if missing:
                leaf, sub, reg = word
                raise SnapshotError(
                    f"this host's KVM lacks CPUID features the snapshot's vCPU {vcpu.index} "
                    f"used: leaf {leaf:#x}.{sub} {reg} bits {missing:#x}")


# -- taking and restoring ------------------------------------------------------

_READABLE_MSRS: Dict[str, List[int]] = {}


def _readable_msrs(vm, vcpu) -> List[int]:
    """The KVM MSR index list, minus the MSRs KVM will not read (cached per
    device).  KVM_GET_MSRS stops at the first one it refuses: skip it."""
    cached = _READABLE_MSRS.get(vm.kvm.path)
    if cached is not None:
        return cached
    indices = vm.kvm.get_msr_index_list()
    readable: List[int] = []
    at = 0
    while at < len(indices):
        got = _get_msrs(vcpu.fd, indices[at:], "KVM_GET_MSRS")
        readable.extend(indices[at:at + len(got)])
        at += len(got) + 1
    _READABLE_MSRS[vm.kvm.path] = readable
    return readable


class _Paused:
    """Holds every vCPU's run lock, and the VM's pause lock, so that nothing
    runs while state is copied; a run() that comes meanwhile waits."""

    def __init__(self, vm):
        self.pause_lock = vm._pause_lock
        self.locks = [v._run_lock for v in vm.vcpus.values()]

    def __enter__(self):
        self.pause_lock.acquire()
        taken = []
        for lock in self.locks:
            if not lock.acquire(blocking=False):
                for t in taken:
                    t.release()
                self.pause_lock.release()
                raise SnapshotError("a vCPU is running: stop it (cpu.stop()) before a "
                                    "snapshot or restore")
            taken.append(lock)
        return self

    def __exit__(self, *exc):
        for lock in self.locks:
            lock.release()
        self.pause_lock.release()


def take(vm) -> Snapshot:
    """Implements :meth:`pyvt.Vm.snapshot`."""
    vm._check_open()
    with _Paused(vm):
        vm._sync_devices()
        for vcpu in vm.vcpus.values():
            vcpu._settle_for_snapshot()
        regions = _take_memory(vm)
        try:
            vcpus = [_take_vcpu(vm, v) for v in sorted(vm.vcpus.values(), key=lambda v: v.index)]
            irqchip = ([vm.fd.get_irqchip(getattr(lib, name)) for name in IRQCHIPS]
                       if vm.fd.has_irqchip else None)
            pit = vm.fd.get_pit2() if vm.fd.has_pit else None
            devices = {name: device.save_state() for name, device in vm.devices.items()
                       if device.has_state}
        except BaseException:
            for image in regions:
                image.close()
            raise
    return Snapshot(backend=vm.backend, regions=regions, vcpus=vcpus, devices=devices,
                    irqchip=irqchip, pit=pit,
                    debug_exit_port=vm.debug_exit.port if vm.debug_exit else None)


def _take_memory(vm) -> List[RegionImage]:
    """Each region's contents in an image of its own; from here on the VM's
    memory is known against them (the baselines a restore uses)."""
    memory = vm.memory
    memory.track_dirty_pages()
    memory.fold()  # what came before goes to the older baselines
    images: List[RegionImage] = []
    try:
        for region in memory.regions:
            images.append(snapshot_memory.capture(region))
    except BaseException:
        for image in images:
            image.close()
        raise
    for region, image in zip(memory.regions, images, strict=True):
        memory.now_equals(region, image)
    return images


def _bytes(cdata) -> bytes:
    return bytes(ffi.buffer(cdata))


def _take_vcpu(vm, vcpu) -> VcpuImage:
    fd = vcpu.fd
    has = vm.kvm.check_extension
    return VcpuImage(
        index=vcpu.index, mode=vcpu.mode,
        regs=_bytes(ffi.addressof(vcpu._load_regs())), sregs=_bytes(fd.get_sregs()),
        fpu=_bytes(fd.get_fpu()),
        events=_bytes(fd.get_vcpu_events()) if has("KVM_CAP_VCPU_EVENTS") else None,
        debugregs=_bytes(fd.get_debugregs()) if has("KVM_CAP_DEBUGREGS") else None,
        mp_state=fd.get_mp_state() if has("KVM_CAP_MP_STATE") else None,
        cpuid=_cpuid_bytes(fd), msrs=fd.get_msrs(_readable_msrs(vm, vcpu)),
        xcrs=_bytes(fd.get_xcrs()) if has("KVM_CAP_XCRS") else None,
        lapic=fd.get_lapic() if vm.fd.has_irqchip else None,
        xsave=_get_xsave(vm, fd))


def _get_xsave(vm, fd) -> Optional[bytes]:
    """The whole XSAVE area (KVM_GET_XSAVE2 where the headers and the
    backend have it), or None for a backend without XSAVE."""
    has = vm.kvm.check_extension
    if lib.PVT_HAVE_KVM_GET_XSAVE2 and "KVM_CAP_XSAVE2" in caps and has("KVM_CAP_XSAVE2"):
        return fd.get_xsave2()
    return fd.get_xsave() if has("KVM_CAP_XSAVE") else None


def _cpuid_bytes(fd) -> bytes:
    from .kvm import cpuid_table

    return bytes(ffi.buffer(cpuid_table(fd.get_cpuid2())))


def _set_struct(setter, ctype: str, data: bytes) -> None:
    value = ffi.new(ctype + " *")
    ffi.buffer(value)[:] = data
    setter(value)


def _restore_vcpu(vm, vcpu, image: VcpuImage) -> None:
    """Puts one vCPU's state back.  The order matters; CPUID (set first, for
    a clone) decides which CR4 and XCR0 bits KVM accepts.

    1. SREGS: CR0/CR4/EFER, and the APIC base, which says how the LAPIC
       state (4) is read (xAPIC or x2APIC).
    2. REGS.  KVM_SET_REGS drops a pending exception: before VCPU_EVENTS (6).
    3. XCRS, XSAVE, FPU.  XCR0 says which state components are enabled, and
       changing it may put components in their initial state, so the XSAVE
       area (x87, SSE, AVX...) goes in once XCR0 has its final value.
       KVM_SET_XSAVE copies only the components its XSTATE_BV names and
       leaves stale bytes under the others, which KVM_GET_FPU reads raw;
       KVM_SET_FPU last puts the x87/SSE bytes back as they were, so that
       both reads match the snapshot.
    4. LAPIC, after SREGS and before MSRS: KVM takes IA32_TSC_DEADLINE only
       while the LAPIC timer is in TSC-deadline mode.
    5. MSRS.
    6. VCPU_EVENTS: pending exception, interrupt, NMI, interrupt shadow.
    7. DEBUGREGS, then MP_STATE.
    """
    fd = vcpu.fd
    _set_struct(fd.set_sregs, "struct kvm_sregs", image.sregs)
    regs = vcpu._load_regs()
    ffi.buffer(ffi.addressof(regs))[:] = image.regs
    vcpu._store_regs(regs)
    if image.xcrs is not None:
        _set_struct(fd.set_xcrs, "struct kvm_xcrs", image.xcrs)
    if image.xsave is not None:
        if len(image.xsave) > fd.xsave_size():
            raise SnapshotError(
                f"vCPU {image.index}'s XSAVE area is {len(image.xsave)} bytes, more than this "
                f"host's KVM takes ({fd.xsave_size()}): the snapshot comes from a host with "
                "more XSAVE state (AMX?)")
        fd.set_xsave(image.xsave)
    _set_struct(fd.set_fpu, "struct kvm_fpu", image.fpu)
    if image.lapic is not None:
        fd.set_lapic(image.lapic)
    _set_msrs(fd, image)
    if image.events is not None:
        _set_struct(fd.set_vcpu_events, "struct kvm_vcpu_events", image.events)
    if image.debugregs is not None:
        _set_struct(fd.set_debugregs, "struct kvm_debugregs", image.debugregs)
    if image.mp_state is not None:
        fd.set_mp_state(image.mp_state)
    vcpu._sregs = None
    vcpu.mode = image.mode
    vcpu.last_exit = None


_REFUSED_MSRS: Dict[str, set] = {}


def _set_msrs(fd, image: VcpuImage) -> None:
    """KVM_SET_MSRS, skipping the few MSRs KVM reports but will not take back
    (it stops at the first refusal; those are remembered per device).  The
    block KVM took whole is kept with the image: a restore loop reuses it."""
    refused = _REFUSED_MSRS.setdefault(fd.vm.kvm.path, set())
    key = (len(refused), tuple(image.msrs.items()))  # `refused` only grows
    if image._msr_block is not None and image._msr_block[0] == key:
        _, block, count = image._msr_block
        if fd._ioctl("KVM_SET_MSRS", lib.KVM_SET_MSRS, block[1]) == count:
            return
    items = [(k, v) for k, v in image.msrs.items() if k not in refused]
    first = True
    while items:
        block = _msrs_struct([index for index, _ in items])
        for n, (_, value) in enumerate(items):
            block[1].entries[n].data = value
        done = fd._ioctl("KVM_SET_MSRS", lib.KVM_SET_MSRS, block[1])
        if first and done == len(items):
            image._msr_block = (key, block, done)
        first = False
        if done < len(items):
            refused.add(items[done][0])
        items = items[done + 1:]


def restore(vm, snap: Snapshot) -> None:
    """Implements :meth:`pyvt.Vm.restore`."""
    vm._check_open()
    _check_same_shape(vm, snap)
    with _Paused(vm):
        vm._sync_devices()
        for vcpu in vm.vcpus.values():
            vcpu._abandon_pending_io()
        _restore_memory(vm, snap)
        _restore_state(vm, snap)


def _restore_memory(vm, snap: Snapshot) -> None:
    """Makes every region hold exactly the snapshot's contents, copying only
    the pages that may differ (see pyvt.snapshot_memory)."""
    memory = vm.memory
    memory.fold()  # every write so far reaches the baselines, in one collection
    pairs = list(zip(memory.regions, snap.regions, strict=True))
    for region, image in pairs:
        snapshot_memory.restore_region(memory, region, image)
    memory.track_dirty_pages()  # the next restores take the fast path
    for region, image in pairs:
        memory.now_equals(region, image)


def _restore_state(vm, snap: Snapshot) -> None:
    """Registers, interrupt controllers and devices (memory aside)."""
    if snap.irqchip is not None:
        for chip in snap.irqchip:
            vm.fd.set_irqchip(chip)
    if snap.pit is not None:
        vm.fd.set_pit2(snap.pit)
    for image in snap.vcpus:
        _restore_vcpu(vm, vm.vcpus[image.index], image)
    for name, state in snap.devices.items():
        device = vm.devices.get(name)
        if device is None:
            raise SnapshotError(f"the snapshot has a {name} device but this VM has none "
                                "(made with pc_devices=False?)")
        try:
            device.load_state(state)
        except Error as e:
            raise SnapshotError(f"cannot restore the {name} device's state: {e}") from None


def _check_open(snap: Snapshot) -> None:
    if snap.closed:
        raise SnapshotError("this snapshot was closed: its memory is gone")


def _check_same_shape(vm, snap: Snapshot) -> None:
    _check_open(snap)
    layout = [(r.gpa, r.size, r.readonly) for r in vm.memory.regions]
    wanted = [(r.gpa, r.size, r.readonly) for r in snap.regions]
    if layout != wanted:
        raise SnapshotError(f"this VM's memory ({layout}) is not the snapshot's ({wanted}); "
                            "use pyvt.Vm.from_snapshot(snap) for a new VM")
    if sorted(vm.vcpus) != sorted(v.index for v in snap.vcpus):
        raise SnapshotError(f"this VM has vCPUs {sorted(vm.vcpus)}, the snapshot "
                            f"{sorted(v.index for v in snap.vcpus)}")
    if (snap.irqchip is not None) != vm.fd.has_irqchip:
        raise SnapshotError("the snapshot and this VM differ in having an in-kernel irqchip")


def clone(snap: Snapshot, backend=None, vm_class=None):
    """Implements :meth:`pyvt.Vm.from_snapshot`."""
    from .vm import Vm, select_backend

    _check_open(snap)
    # Snapshots from another host arrive through Snapshot.load, which checks
    # CPUID; one taken here runs here.
    path = select_backend(backend if backend is not None else snap.backend)
    main = snap.regions[0]
    vm = (vm_class or Vm)(memory=main.size, backend=path, debug_exit_port=snap.debug_exit_port,
                          pc_devices=snap.pc_devices, _memory_source=main.memfd)
    try:
        vm.memory.regions[0].origin = main
        for saved in snap.regions[1:]:
            region = vm.memory.add_region(saved.gpa, saved.size, saved.readonly,
                                          copy_on_write_of=saved.memfd)
            region.origin = saved
        if snap.irqchip is not None:
            vm.fd.create_irqchip()
        if snap.pit is not None:
            vm.fd.create_pit2()
        for state in snap.vcpus:
            vcpu = vm._new_vcpu(state.index, state.mode, setup=False)
            vcpu.fd.set_cpuid2_table(state.cpuid)
        _restore_state(vm, snap)
    except BaseException:
        vm.close()
        raise
    return vm
