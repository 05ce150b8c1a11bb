"""Snapshots: everything needed to put a VM back exactly where it was.

``snap = vm.snapshot()`` copies guest memory and every vCPU's state (general,
special and FPU registers, XCRs, MSRs, events, MP state, debug registers,
the LAPIC and the in-kernel irqchip and PIT when present) and the native
devices' state.  ``vm.restore(snap)`` puts the same VM back in place and
copies back only the pages written since the snapshot (KVM's dirty log, plus
pyvt's own ``vm.memory.write``).  ``pyvt.Vm.from_snapshot(snap)`` makes a new
VM whose memory is a copy-on-write mapping of the snapshot's: N clones cost
only the pages each one writes.  ``snap.save(path)`` / ``Snapshot.load(path)``
keep a snapshot in a versioned, checksummed file.

The snapshot's memory lives in memfds owned by the snapshot; close it (or let
the GC do it) to free them.  Clones keep what they map alive on their own.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from ._kvm import ffi, lib
from . import pc
from .errors import Error
from .kvm import _get_msrs, _msrs_struct

FORMAT_VERSION = 1
MAGIC = b"PYVTSNAP"
PAGE_SIZE = mmap.PAGESIZE

#: Kernel structs whose bytes a snapshot stores: a file made with other
#: layouts (other headers) is refused.
STRUCTS = ("struct kvm_regs", "struct kvm_sregs", "struct kvm_fpu", "struct kvm_xcrs",
           "struct kvm_vcpu_events", "struct kvm_debugregs", "struct kvm_lapic_state",
           "struct kvm_irqchip", "struct kvm_pit_state2")

#: CPUID feature words a guest may have used: (leaf, subleaf, register).
FEATURE_WORDS = ((1, 0, "ecx"), (1, 0, "edx"), (7, 0, "ebx"), (7, 0, "ecx"), (7, 0, "edx"),
                 (0x80000001, 0, "ecx"), (0x80000001, 0, "edx"))

_IRQCHIPS = ("KVM_IRQCHIP_PIC_MASTER", "KVM_IRQCHIP_PIC_SLAVE", "KVM_IRQCHIP_IOAPIC")


class SnapshotError(Error):
    """A snapshot cannot be taken, restored or read (the message says why)."""


@dataclass
class RegionImage:
    """One memory slot's contents, in a memfd the snapshot owns."""

    gpa: int
    size: int
    readonly: bool
    memfd: int
    mapping: Optional[mmap.mmap] = None  # read view, for restore copies

    def close(self) -> None:
        if self.mapping is not None:
            try:
                self.mapping.close()
            except BufferError:
                pass
            self.mapping = None
        if self.memfd >= 0:
            os.close(self.memfd)
            self.memfd = -1


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


@dataclass
class Snapshot:
    """A VM frozen in time.  Made by :meth:`pyvt.Vm.snapshot` or :meth:`load`."""

    backend: str
    regions: List[RegionImage]
    vcpus: List[VcpuImage]
    devices: Dict[str, Tuple[bytes, bytes]]  # name -> (registers, output so far)
    irqchip: Optional[List[bytes]] = None
    pit: Optional[bytes] = None
    debug_exit_port: Optional[int] = 0xF4
    #: pyvt.pc.save_state(): fw_cfg (items, files, read position), CMOS,
    #: i8042, POST code; None for a VM made with pc_devices=False.
    pc: Optional[Dict[str, Any]] = None

    @property
    def memory_size(self) -> int:
        return self.regions[0].size

    def __repr__(self) -> str:
        return (f"<Snapshot {self.memory_size >> 20} MiB, {len(self.regions)} region(s), "
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

    # -- file format ---------------------------------------------------------

    def save(self, path: str) -> None:
        """Writes the snapshot to ``path``: a header (JSON), the blobs it
        names, and a SHA-256 of everything before it."""
        blobs: List[bytes] = []

        def blob(data: bytes) -> int:
            blobs.append(data)
            return len(blobs) - 1

        header: Dict[str, Any] = {
            "format": FORMAT_VERSION,
            "pyvt": _pyvt_version(),
            "structs": _struct_sizes(),
            "page_size": PAGE_SIZE,
            "backend": self.backend,
            "debug_exit_port": self.debug_exit_port,
            "regions": [],
            "vcpus": [],
            "devices": {name: [blob(state), blob(output)]
                        for name, (state, output) in self.devices.items()},
            "irqchip": None if self.irqchip is None else [blob(c) for c in self.irqchip],
            "pit": None if self.pit is None else blob(self.pit),
            "pc": None if self.pc is None else _pc_to_header(self.pc, blob),
        }
        for region in self.regions:
            pages, data = _nonzero_pages(region)
            header["regions"].append({"gpa": region.gpa, "size": region.size,
                                      "readonly": region.readonly, "pages": blob(pages),
                                      "data": blob(data)})
        for v in self.vcpus:
            header["vcpus"].append({
                "index": v.index, "mode": v.mode, "mp_state": v.mp_state,
                "msrs": {str(k): val for k, val in v.msrs.items()},
                "regs": blob(v.regs), "sregs": blob(v.sregs), "fpu": blob(v.fpu),
                "events": None if v.events is None else blob(v.events),
                "debugregs": None if v.debugregs is None else blob(v.debugregs),
                "cpuid": blob(v.cpuid),
                "xcrs": None if v.xcrs is None else blob(v.xcrs),
                "lapic": None if v.lapic is None else blob(v.lapic),
            })
        header["blobs"] = [len(b) for b in blobs]
        head = json.dumps(header, sort_keys=True).encode()
        digest = hashlib.sha256()
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            for part in (MAGIC, struct.pack("<II", FORMAT_VERSION, len(head)), head, *blobs):
                digest.update(part)
                f.write(part)
            f.write(digest.digest())
        os.replace(tmp, path)  # never a half-written file under the real name

    @classmethod
    def load(cls, path: str, backend=None) -> "Snapshot":
        """Reads a snapshot file, checking its format version, checksum and
        completeness, and that this host's KVM offers every CPUID feature
        the snapshot's vCPUs were shown."""
        with open(path, "rb") as f:
            raw = f.read()
        if raw[:len(MAGIC)] != MAGIC:
            raise SnapshotError(f"{path} is not a pyvt snapshot")
        if len(raw) < len(MAGIC) + 8 + 32:
            raise SnapshotError(f"{path} is truncated")
        version, head_len = struct.unpack_from("<II", raw, len(MAGIC))
        if version != FORMAT_VERSION:
            raise SnapshotError(f"{path} has snapshot format {version}; this pyvt "
                                f"({_pyvt_version()}) reads format {FORMAT_VERSION}")
        body, digest = raw[:-32], raw[-32:]
        if hashlib.sha256(body).digest() != digest:
            raise SnapshotError(f"{path} is corrupted or truncated: its checksum does not match")
        start = len(MAGIC) + 8
        header = json.loads(body[start:start + head_len])
        if header["structs"] != _struct_sizes() or header["page_size"] != PAGE_SIZE:
            raise SnapshotError(f"{path} was made by a pyvt built against other kernel headers "
                                f"(pyvt {header.get('pyvt')}); the register layouts differ")
        blobs, at = [], start + head_len
        for length in header["blobs"]:
            blobs.append(body[at:at + length])
            at += length
        if at != len(body):
            raise SnapshotError(f"{path} is malformed: its blobs do not add up")

        def get(i):
            return None if i is None else blobs[i]

        regions = [_region_from_pages(r["gpa"], r["size"], r["readonly"], get(r["pages"]),
                                      get(r["data"])) for r in header["regions"]]
        vcpus = [VcpuImage(index=v["index"], mode=v["mode"], regs=get(v["regs"]),
                           sregs=get(v["sregs"]), fpu=get(v["fpu"]), events=get(v["events"]),
                           debugregs=get(v["debugregs"]), mp_state=v["mp_state"],
                           cpuid=get(v["cpuid"]),
                           msrs={int(k): val for k, val in v["msrs"].items()},
                           xcrs=get(v["xcrs"]), lapic=get(v["lapic"]))
                 for v in header["vcpus"]]
        snap = cls(backend=header["backend"], regions=regions, vcpus=vcpus,
                   devices={name: (get(s), get(o)) for name, (s, o) in header["devices"].items()},
                   irqchip=None if header["irqchip"] is None else [get(i) for i in header["irqchip"]],
                   pit=get(header["pit"]), debug_exit_port=header["debug_exit_port"],
                   pc=None if header["pc"] is None else _pc_from_header(header["pc"], get))
        from .kvm import Kvm
        from .vm import select_backend

        check_cpuid(snap, Kvm.shared(select_backend(backend)))
        return snap


def _pc_to_header(pc: Dict[str, Any], blob) -> Dict[str, Any]:
    """pyvt.pc state for the JSON header, bytes as blob numbers."""
    fw = pc["fw_cfg"]
    return {
        "fw_cfg": None if fw is None else {
            "items": [[key, blob(data)] for key, data in sorted(fw["items"].items())],
            "files": [[key, name, blob(data)] for key, name, data in fw["files"]],
            "position": list(fw["position"]),
        },
        **{name: None if pc[name] is None else blob(pc[name]) for name in ("cmos", "i8042", "post")},
    }


def _pc_from_header(header: Dict[str, Any], get) -> Dict[str, Any]:
    fw = header["fw_cfg"]
    return {
        "fw_cfg": None if fw is None else {
            "items": {key: get(i) for key, i in fw["items"]},
            "files": [(key, name, get(i)) for key, name, i in fw["files"]],
            "position": tuple(fw["position"]),
        },
        **{name: get(header[name]) for name in ("cmos", "i8042", "post")},
    }


def _pyvt_version() -> str:
    from . import __version__

    return __version__


def _struct_sizes() -> Dict[str, int]:
    return {name: ffi.sizeof(name) for name in STRUCTS}


def _nonzero_pages(region: RegionImage) -> Tuple[bytes, bytes]:
    """(page numbers as u32, their bytes): files skip pages of zeros."""
    assert region.mapping is not None
    zero = bytes(PAGE_SIZE)
    numbers, data = [], []
    for page in range(region.size // PAGE_SIZE):
        chunk = region.mapping[page * PAGE_SIZE:(page + 1) * PAGE_SIZE]
        if chunk != zero:
            numbers.append(page)
            data.append(chunk)
    return struct.pack(f"<{len(numbers)}I", *numbers), b"".join(data)


def _new_image(gpa: int, size: int, readonly: bool) -> RegionImage:
    memfd = os.memfd_create(f"pyvt-snapshot-{gpa:#x}", os.MFD_CLOEXEC)
    try:
        os.ftruncate(memfd, size)
        mapping = mmap.mmap(memfd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError as e:
        os.close(memfd)
        raise SnapshotError(f"cannot allocate {size:#x} bytes for a snapshot: {e.strerror}") from None
    return RegionImage(gpa, size, readonly, memfd, mapping)


def _region_from_pages(gpa, size, readonly, pages: bytes, data: bytes) -> RegionImage:
    image = _new_image(gpa, size, readonly)
    assert image.mapping is not None
    numbers = struct.unpack(f"<{len(pages) // 4}I", pages)
    if len(data) != len(numbers) * PAGE_SIZE or any(n * PAGE_SIZE >= size for n in numbers):
        image.close()
        raise SnapshotError("snapshot memory pages do not fit their region")
    for i, page in enumerate(numbers):
        image.mapping[page * PAGE_SIZE:(page + 1) * PAGE_SIZE] = data[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]
    return image


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


def _char_devices(vm) -> Dict[str, Any]:
    return {"console": vm.console, "debugcon": vm.debugcon}


def take(vm) -> Snapshot:
    """Implements :meth:`pyvt.Vm.snapshot`."""
    vm._check_open()
    with _Paused(vm):
        vm._sync_devices()
        for vcpu in vm.vcpus.values():
            vcpu._settle_for_snapshot()
        regions = []
        try:
            for region in vm.memory.regions:
                image = _new_image(region.gpa, region.size, region.readonly)
                regions.append(image)
                image.mapping[:] = region.buffer[:]  # type: ignore[index]
        except BaseException:
            for image in regions:
                image.close()
            raise
        vm.memory.track_dirty_pages()
        vcpus = [_take_vcpu(vm, v) for v in sorted(vm.vcpus.values(), key=lambda v: v.index)]
        irqchip = ([vm.fd.get_irqchip(getattr(lib, name)) for name in _IRQCHIPS]
                   if vm.fd.has_irqchip else None)
        pit = vm.fd.get_pit2() if vm.fd.has_pit else None
        devices = {name: (dev._native.save_state(), dev._native.output())
                   for name, dev in _char_devices(vm).items()}
        pc_state = pc.save_state(vm) if vm.fw_cfg is not None else None
    return Snapshot(backend=vm.backend, regions=regions, vcpus=vcpus, devices=devices,
                    irqchip=irqchip, pit=pit,
                    debug_exit_port=vm.debug_exit.port if vm.debug_exit else None,
                    pc=pc_state)


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
        lapic=fd.get_lapic() if vm.fd.has_irqchip else None)


def _cpuid_bytes(fd) -> bytes:
    from .kvm import cpuid_table

    return bytes(ffi.buffer(cpuid_table(fd.get_cpuid2())))


def _set_struct(setter, ctype: str, data: bytes) -> None:
    value = ffi.new(ctype + " *")
    ffi.buffer(value)[:] = data
    setter(value)


def _restore_vcpu(vm, vcpu, image: VcpuImage) -> None:
    fd = vcpu.fd
    _set_struct(fd.set_sregs, "struct kvm_sregs", image.sregs)
    regs = vcpu._load_regs()
    ffi.buffer(ffi.addressof(regs))[:] = image.regs
    vcpu._store_regs(regs)
    _set_struct(fd.set_fpu, "struct kvm_fpu", image.fpu)
    if image.xcrs is not None:
        _set_struct(fd.set_xcrs, "struct kvm_xcrs", image.xcrs)
    _set_msrs(fd, image.msrs)
    if image.lapic is not None:
        fd.set_lapic(image.lapic)
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


def _set_msrs(fd, msrs: Dict[int, int]) -> None:
    """KVM_SET_MSRS, skipping the few MSRs KVM reports but will not take back
    (it stops at the first refusal; those are remembered per device)."""
    refused = _REFUSED_MSRS.setdefault(fd.vm.kvm.path, set())
    items = [(k, v) for k, v in msrs.items() if k not in refused]
    while items:
        _buf, block = _msrs_struct([index for index, _ in items])
        for n, (_, value) in enumerate(items):
            block.entries[n].data = value
        done = fd._ioctl("KVM_SET_MSRS", lib.KVM_SET_MSRS, block)
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
    """Copies back the pages written since the snapshot (or since the last
    restore)."""
    for region, saved in zip(vm.memory.regions, snap.regions, strict=True):
        source = saved.mapping
        if source is None:
            raise SnapshotError("this snapshot was closed: its memory is gone")
        if region.readonly:
            continue
        target = region.buffer
        if region.dirty_logging:
            pages = vm.memory.take_dirty_pages(region)
        else:
            # A clone nothing has tracked yet (enabling KVM's dirty log costs
            # milliseconds that clones should not pay up front), or a backend
            # with no dirty log: compare pages (reading keeps them shared).
            pages = [p for p in range(region.size // PAGE_SIZE)
                     if target[p * PAGE_SIZE:(p + 1) * PAGE_SIZE]
                     != source[p * PAGE_SIZE:(p + 1) * PAGE_SIZE]]
            vm.memory.track_dirty_pages()
        if pages:
            with memoryview(target) as into, memoryview(source) as out_of:
                for page in pages:  # memoryview slices: one memcpy per page
                    at = page * PAGE_SIZE
                    into[at:at + PAGE_SIZE] = out_of[at:at + PAGE_SIZE]


def _restore_state(vm, snap: Snapshot) -> None:
    """Registers, interrupt controllers and devices (memory aside)."""
    if snap.irqchip is not None:
        for chip in snap.irqchip:
            vm.fd.set_irqchip(chip)
    if snap.pit is not None:
        vm.fd.set_pit2(snap.pit)
    for image in snap.vcpus:
        _restore_vcpu(vm, vm.vcpus[image.index], image)
    for name, dev in _char_devices(vm).items():
        state, output = snap.devices[name]
        if dev._native.load_state(state) or dev._native.replace_output(output):
            raise SnapshotError(f"cannot restore the {name} device's state")
    if snap.pc is not None:
        try:
            pc.load_state(vm, snap.pc)
        except Error as e:
            raise SnapshotError(f"cannot restore the PC devices: {e}") from None


def _check_same_shape(vm, snap: Snapshot) -> None:
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

    # Snapshots from another host arrive through Snapshot.load, which checks
    # CPUID; one taken here runs here.
    path = select_backend(backend if backend is not None else snap.backend)
    main = snap.regions[0]
    if main.memfd < 0:
        raise SnapshotError("this snapshot was closed: its memory is gone")
    vm = (vm_class or Vm)(memory=main.size, backend=path, debug_exit_port=snap.debug_exit_port,
                          pc_devices=snap.pc is not None, _memory_source=main.memfd)
    try:
        for saved in snap.regions[1:]:
            vm.memory.add_region(saved.gpa, saved.size, saved.readonly,
                                 copy_on_write_of=saved.memfd)
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
