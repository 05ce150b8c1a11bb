"""Snapshots: everything needed to put a VM back exactly where it was.

``snap = vm.snapshot()`` copies guest memory, every vCPU's state (what
:meth:`pyvt.Vcpu.save_state` returns: registers, the XSAVE area, XCRs, MSRs
with the TSC, events, MP state, debug registers, the LAPIC, nested state
where supported; see :mod:`pyvt.vcpu_state`), the VM's KVM clock and
in-kernel irqchip and PIT when present (``Vm.save_clock``, ``save_irqchip``,
``save_pit``) and the native devices' state.  This module only orchestrates:
it pauses the VM, asks each owner for its state and gives it back; the
file format is :mod:`pyvt.snapshot_file`'s, the CPUID check
:mod:`pyvt.cpu_features`'.  ``vm.restore(snap)`` puts
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

import mmap
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from . import _native, clone_pool, device_model, snapshot_file, snapshot_memory, state_hooks
from .backend import select_backend
from .cpu_features import check_cpuid
from .devices import restore_states
from .errors import SnapshotError, SnapshotFileError, SnapshotFileNotFound
from .kvm import Kvm
from .snapshot_file import FORMAT_VERSION, MAGIC, STRUCTS
from .snapshot_memory import PAGE_SIZE, RegionImage
from .vcpu import paused
from .vcpu_state import VcpuState

__all__ = ["Snapshot", "VcpuState", "VcpuImage", "RegionImage", "SnapshotError",
           "SnapshotFileError", "SnapshotFileNotFound", "FORMAT_VERSION", "MAGIC", "STRUCTS",
           "PAGE_SIZE", "check_cpuid"]

#: The name VcpuState had before it moved to its owner (pyvt.vcpu_state).
VcpuImage = VcpuState


@dataclass
class Snapshot:
    """A VM frozen in time.  Made by :meth:`pyvt.Vm.snapshot` or :meth:`load`."""

    backend: str
    regions: List[RegionImage]
    vcpus: List[VcpuState]
    #: Each native device's state, ``{name: device.save_state()}``: the
    #: consoles' registers and output, fw_cfg (items, files, read position),
    #: CMOS, i8042, POST code (the PC devices absent for pc_devices=False).
    devices: Dict[str, Any]
    irqchip: Optional[List[bytes]] = None
    pit: Optional[bytes] = None
    debug_exit_port: Optional[int] = _native.DEBUG_EXIT_PORT
    #: The KVM clock in ns (Vm.save_clock); None where the backend lacks it.
    clock: Optional[int] = None
    #: The state of each ``vm.add_state`` hook, ``{name: save()}``
    #: (:mod:`pyvt.state_hooks`); snapshot files do not carry it.
    hooks: Dict[str, Any] = field(default_factory=dict)

    @property
    def pc_devices(self) -> bool:
        """Whether the VM had the PC devices (``Vm(pc_devices=...)``)."""
        return any(device_model.by_name(name).pc for name in self.devices)

    @property
    def memory_size(self) -> int:
        return self.regions[0].size

    @property
    def closed(self) -> bool:
        for region in self.regions:  # a loop, not any(): every restore asks
            if region.closed:
                return True
        return False

    def __repr__(self) -> str:
        state = " closed" if self.closed else ""
        return (f"<Snapshot{state} {self.memory_size >> 20} MiB, {len(self.regions)} region(s), "
                f"{len(self.vcpus)} vCPU(s)>")

    def close(self) -> None:
        """Frees the snapshot's memory (clones keep their own mappings) and
        closes the prepared clones nobody took (:meth:`prepare_clones`)."""
        clone_pool.close_all(self)
        for region in self.regions:
            region.close()

    def prepare_clones(self, count: int, backend=None) -> None:
        """Makes ``count`` clones now, for :meth:`pyvt.Vm.from_snapshot` to
        hand out later at a fraction of its cost (see :mod:`pyvt.clone_pool`:
        each is brought to this snapshot's state of the moment it is taken).
        ``backend`` as for from_snapshot.  The clones are pyvt.Vm objects:
        ``from_snapshot`` of a subclass makes its own."""
        from .vm import Vm

        _check_open(self)
        path = select_backend(backend if backend is not None else self.backend)
        clone_pool.prepare(self, count, Vm, path, lambda: _new_clone(self, Vm, path))

    @property
    def prepared_clones(self) -> int:
        """How many prepared clones wait to be taken."""
        return len(clone_pool.prepared(self))

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
        snap = snapshot_file.load(path)
        try:
            kvm = Kvm.shared(select_backend(backend))
            check_cpuid(snap, kvm)
            snap.backend = kvm.path
        except BaseException:
            snap.close()
            raise
        return snap


# -- taking and restoring ------------------------------------------------------


def take(vm) -> Snapshot:
    """Implements :meth:`pyvt.Vm.snapshot`."""
    vm._check_open()
    with paused(vm, "complete writes"):
        vm._sync_devices()
        regions = _take_memory(vm)
        try:
            return take_state(vm, regions)
        except BaseException:
            for image in regions:
                image.close()
            raise


def take_state(vm, regions: List[RegionImage]) -> Snapshot:
    """Everything of a paused ``vm`` but its memory (``regions``: the
    images to put in the snapshot): every vCPU, the clock, irqchip, PIT,
    native devices and state hooks.  Shared by :func:`take` and live
    migration (:mod:`pyvt.migration`), which sends memory on its own."""
    vcpus = [v.save_state() for v in sorted(vm.vcpus.values(), key=lambda v: v.index)]
    irqchip, pit, clock = vm.save_irqchip(), vm.save_pit(), vm.save_clock()
    devices = {name: device.save_state() for name, device in vm.devices.items()
               if device.has_state}
    return Snapshot(backend=vm.backend, regions=regions, vcpus=vcpus, devices=devices,
                    irqchip=irqchip, pit=pit,
                    debug_exit_port=vm.debug_exit.port if vm.debug_exit else None,
                    clock=clock, hooks=state_hooks.save_all(vm))


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


def restore(vm, snap: Snapshot, user_mode_only: bool = False) -> None:
    """Implements :meth:`pyvt.Vm.restore`."""
    vm._check_open()
    states = _check_same_shape(vm, snap)
    with paused(vm, "abandon", states):
        vm._sync_devices()
        _restore_memory(vm, snap)
        _restore_state(vm, snap, user_mode_only)


def _restore_memory(vm, snap: Snapshot) -> None:
    """Makes every region hold exactly the snapshot's contents, copying only
    the pages that may differ (see pyvt.snapshot_memory)."""
    memory = vm.memory
    pairs = list(zip(memory.regions, snap.regions, strict=True))
    if _restore_logged_memory(memory, pairs):
        return
    memory.fold()  # every write so far reaches the baselines, in one collection
    for region, image in pairs:
        snapshot_memory.restore_region(memory, region, image)
    memory.track_dirty_pages()  # the next restores take the fast path
    for region, image in pairs:
        memory.now_equals(region, image)


def _restore_logged_memory(memory, pairs) -> bool:
    """_restore_memory's fast path, where every region is pyvt's own RAM
    with KVM's dirty bitmap and a baseline for its image: per region, one
    native call takes the dirty log and copies back the pages it and the
    baseline name (with the host's writes), and the baselines learn what
    fold(), restore_region() and now_equals() would have told them.
    False (nothing done) where it does not apply."""
    if memory._vm_fd.dirty_ring_size or PAGE_SIZE != _native.PAGE_RESTORE_PAGE_SIZE:
        return False
    bases = []
    for region, image in pairs:
        base = region.baselines.get(image)
        if not (region.dirty_logging and region.host_dirty is not None and region.host_writable
                and region.source is None and isinstance(region.mapping, mmap.mmap)
                and image.mapping is not None and base is not None):
            return False
        bases.append(base)
    fd = memory._vm_fd.fileno()
    logged_pages = 0
    with memory._dirty_lock:
        for (region, image), base in zip(pairs, bases, strict=True):
            bitmap = snapshot_memory.data_bitmap(image)
            zeros = snapshot_memory.zero_bitmap(len(bitmap))
            # An idle VM's bitmaps are all zeros: compared as bytes (a memcmp),
            # they skip the int conversions.
            host_dirty = region.host_dirty
            host = (0 if host_dirty == snapshot_memory.zero_bitmap(len(host_dirty))
                    else int.from_bytes(host_dirty, "little"))
            also = base | host
            logged = _native.restore_logged_pages(
                fd, region.slot, region.pages, region.mapping, image.mapping, bitmap,
                also.to_bytes(len(bitmap), "little") if also else zeros)
            if host:
                region.host_dirty = bytearray(len(host_dirty))
            written = 0 if logged == zeros else int.from_bytes(logged, "little")
            logged_pages += written.bit_count()
            note_copied_back(memory, region, image, also | written)
        memory.dirty_rate.record_pages(logged_pages)  # as GuestMemory._collect does
    return True


def note_copied_back(memory, region, image: RegionImage, written: int) -> None:
    """Memory bookkeeping after a restore of ``region`` to ``image`` that
    copied back ``written`` (a pageset: the pages written since the last
    collection, by the guest or the host): they changed against every other
    baseline and are reported; the region equals ``image`` again.  The
    caller holds ``memory._dirty_lock``; ``image`` has a baseline."""
    if not written:
        return  # the baseline was 0 already: nothing was written since
    if len(region.baselines) == 1:  # image's alone: no other baseline to tell
        region.unreported |= written
    else:
        memory._add_written(region, written)
    region.baselines[image] = 0


def _restore_state(vm, snap: Snapshot, user_mode_only: bool = False,
                   hooks: bool = True) -> None:
    """Registers, interrupt controllers, the clock and devices (memory
    aside).  The interrupt controllers go first: the LAPICs a vCPU's state
    carries deliver through them.  The KVM clock goes after the vCPUs'
    TSCs (as QEMU does): KVM refreshes each vCPU's kvmclock page from both
    before the vCPU runs.  ``user_mode_only``: see :meth:`pyvt.Vm.restore`
    (the clock keeps running, as the TSC does)."""
    if snap.irqchip is not None:
        vm.restore_irqchip(snap.irqchip)
    if snap.pit is not None:
        vm.restore_pit(snap.pit)
    for saved in snap.vcpus:
        vm.vcpus[saved.index].restore_state(saved, user_mode_only)
    if (snap.clock is not None and not user_mode_only and _uses_kvmclock(snap)
            and vm.kvm.check_extension("KVM_CAP_ADJUST_CLOCK")):
        vm.restore_clock(snap.clock)
    _restore_devices(vm, snap)
    if hooks:  # a clone is made without hooks: its state stays in the snapshot
        state_hooks.load_all(vm, snap.hooks)


def _restore_devices(vm, snap: Snapshot) -> None:
    """Each native device's state (none where every device holds what the
    last restore put, with no guest run and no host access since: see
    pyvt.devices.restore_states).  With an in-kernel irqchip every
    state is put: restore_irqchip has just put back the lines the UART's
    load drives."""
    runs = None if vm.fd.has_irqchip else _kvm_runs(vm)
    restore_states(vm, snap.devices, runs)


def _kvm_runs(vm) -> tuple:
    """How many times each vCPU of ``vm`` has entered KVM_RUN (-1 once
    closed): while they stay the same, no guest code ran."""
    return tuple([-1 if vcpu._loop is None else _native.kvm_runs(vcpu._loop)
                  for vcpu in vm.vcpus.values()])


#: The kvmclock MSRs (MSR_KVM_SYSTEM_TIME_NEW and the old number): bit 0
#: of either enables the guest's kvmclock page.
KVMCLOCK_MSRS = (0x4B564D01, 0x12)


def _uses_kvmclock(snap: Snapshot) -> bool:
    """Whether a vCPU of ``snap`` had enabled kvmclock.  The KVM clock is
    what kvmclock pages show and nothing else a guest reads (its TSC travels
    as IA32_TSC, its timers run on host time): where no vCPU uses it,
    KVM_SET_CLOCK would change nothing the guest can see, so a restore
    saves the ioctl."""
    for state in snap.vcpus:  # a loop, not any(): a restore loop calls this each time
        msrs = state.msrs
        if msrs.get(KVMCLOCK_MSRS[0], 0) & 1 or msrs.get(KVMCLOCK_MSRS[1], 0) & 1:
            return True
    return False


def _check_open(snap: Snapshot) -> None:
    if snap.closed:
        raise SnapshotError("this snapshot was closed: its memory is gone")


def _open_and_same_layout(regions, images) -> bool:
    """Whether a snapshot's ``images`` are all open and have the places,
    sizes and read-only flags of the VM's memory ``regions`` (one loop: a
    restore loop checks it each time)."""
    if len(regions) != len(images):
        return False
    for region, image in zip(regions, images, strict=True):  # (lengths checked)
        if (image.memfd < 0 or region.gpa != image.gpa or region.size != image.size
                or region.readonly != image.readonly):
            return False
    return True


def _check_same_shape(vm, snap: Snapshot) -> Dict[int, VcpuState]:
    """Refuses a snapshot ``vm`` cannot take back (closed, or of another
    memory layout, vCPUs or irqchip); returns its vCPU states by index."""
    if not _open_and_same_layout(vm.memory.regions, snap.regions):
        _check_open(snap)
        layout = [(r.gpa, r.size, r.readonly) for r in vm.memory.regions]
        wanted = [(r.gpa, r.size, r.readonly) for r in snap.regions]
        raise SnapshotError(f"this VM's memory ({layout}) is not the snapshot's ({wanted}); "
                            "use pyvt.Vm.from_snapshot(snap) for a new VM")
    states = {state.index: state for state in snap.vcpus}
    if len(states) != len(snap.vcpus) or vm.vcpus.keys() != states.keys():
        raise SnapshotError(f"this VM has vCPUs {sorted(vm.vcpus)}, the snapshot "
                            f"{sorted(v.index for v in snap.vcpus)}")
    if (snap.irqchip is not None) != vm.fd.has_irqchip:
        raise SnapshotError("the snapshot and this VM differ in having an in-kernel irqchip")
    return states


def clone(snap: Snapshot, vm_class, backend=None):
    """Implements :meth:`pyvt.Vm.from_snapshot` (``vm_class``: pyvt.Vm or a
    subclass): a prepared clone where there is one (Snapshot.prepare_clones),
    else a new one."""
    _check_open(snap)
    # Snapshots from another host arrive through Snapshot.load, which checks
    # CPUID; one taken here runs here.
    path = select_backend(backend if backend is not None else snap.backend)
    prepared = clone_pool.take(snap, vm_class, path,
                               lambda vm: _restore_state(vm, snap, hooks=False))
    return prepared if prepared is not None else _new_clone(snap, vm_class, path)


def _new_clone(snap: Snapshot, vm_class, path: str):
    """A new VM in ``snap``'s state on the backend at ``path``."""
    main = snap.regions[0]
    vm = vm_class(memory=main.size, backend=path, debug_exit_port=snap.debug_exit_port,
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
            vcpu = vm._new_vcpu(state.index, state.mode, setup=False, ring=state.ring)
            vcpu.fd.set_cpuid2_table(state.cpuid)
        _restore_state(vm, snap, hooks=False)
    except BaseException:
        vm.close()
        raise
    return vm
