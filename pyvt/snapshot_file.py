"""The snapshot file format: ``snap.save(path)`` and ``Snapshot.load(path)``.

A file is ``MAGIC``, the format version and the header's length (two
little-endian u32), the header (JSON), the blobs it names by number (their
lengths are the header's ``blobs``), and a SHA-256 of everything before it.
Guest memory is stored sparse: for each region, the runs of pages holding
data (``(first page, count)`` as little-endian u64 pairs) and those pages'
bytes.  Kernel structs are stored as their bytes, so a file is refused by a
pyvt built against headers with other layouts (``structs``).

Loading refuses, with a :class:`pyvt.SnapshotError` saying what is wrong, a
file of another format version, a corrupted or truncated one, and a header
that is not exactly what ``save`` writes: every field is checked (type,
range, blob numbers, and the size of every blob against its struct) before
anything is used.  Saving writes a temporary file next to ``path`` and
renames it, so ``path`` never holds half a file; a failed save leaves
nothing behind.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import struct
from typing import Any, Dict, List, NoReturn, Optional

from . import _native, device_model, modes, pageset
from ._kvm import ffi, lib
from .errors import (
    ArgumentError,
    DeviceStateError,
    SnapshotError,
    SnapshotFileError,
    SnapshotFileNotFound,
)
from .snapshot_memory import PAGE_SIZE, RegionImage, new_image, write_pages
from .vcpu_state import VcpuState

#: 3: vCPU state from its owner (pyvt.vcpu_state: sregs2, nested state), the
#: KVM clock.  4: the UART's interrupt state (THR-empty pending, modem
#: status deltas, the IRQ line level) in its registers blob.  Older files
#: lack state a restore needs: they are refused.
FORMAT_VERSION = 4
MAGIC = b"PYVTSNAP"
_PREFIX = struct.Struct("<II")  # format version, header length
_RUN = struct.Struct("<QQ")  # first page, page count
_DIGEST = 32  # SHA-256
_CHUNK = 1 << 20

#: Kernel structs whose bytes a snapshot stores: a file made with other
#: layouts (other headers) is refused.
STRUCTS = ("struct kvm_regs", "struct kvm_sregs", "struct kvm_sregs2", "struct kvm_fpu",
           "struct kvm_xcrs", "struct kvm_nested_state",
           "struct kvm_xsave", "struct kvm_vcpu_events", "struct kvm_debugregs",
           "struct kvm_lapic_state", "struct kvm_irqchip", "struct kvm_pit_state2")

#: The in-kernel interrupt controllers, in the order a snapshot lists them.
IRQCHIPS = ("KVM_IRQCHIP_PIC_MASTER", "KVM_IRQCHIP_PIC_SLAVE", "KVM_IRQCHIP_IOAPIC")

#: Limits a header must keep: x86's widest physical address, KVM's most
#: CPUID entries (generously), the largest XSAVE area CPUs have (generously).
MAX_PHYSICAL_ADDRESS = 1 << 52
MAX_CPUID_ENTRIES = 4096
MAX_XSAVE_SIZE = 1 << 20


def struct_sizes() -> Dict[str, int]:
    return {name: ffi.sizeof(name) for name in STRUCTS}


def _pyvt_version() -> str:
    from . import __version__

    return __version__


def _file_error(error: OSError, doing: str, path: str) -> SnapshotFileError:
    kind = SnapshotFileNotFound if error.errno == errno.ENOENT else SnapshotFileError
    reason = error.strerror or str(error)
    return kind(error.errno, f"cannot {doing} {path}: {reason}", path)


def _as_path(path) -> str:
    if isinstance(path, bytes):
        return os.fsdecode(path)
    if not isinstance(path, (str, os.PathLike)):
        raise ArgumentError(f"a snapshot path must be a str or os.PathLike, not {path!r}")
    return os.fsdecode(os.fspath(path))


# -- saving --------------------------------------------------------------------------


class _RegionData:
    """A blob streamed from a region image's data pages when written."""

    def __init__(self, image: RegionImage):
        self.image = image
        self.runs = pageset.runs(image.data)
        self.length = sum(count for _, count in self.runs) * PAGE_SIZE

    def parts(self):
        mapping = self.image.mapping
        assert mapping is not None
        for first, count in self.runs:
            for at in range(first, first + count, _CHUNK // PAGE_SIZE):
                n = min(_CHUNK // PAGE_SIZE, first + count - at)
                yield mapping[at * PAGE_SIZE:(at + n) * PAGE_SIZE]


def save(snap, path) -> None:
    """Implements :meth:`pyvt.Snapshot.save`."""
    path = _as_path(path)
    if snap.closed:
        raise SnapshotError("this snapshot was closed: its memory is gone (save it before "
                            "closing it)")
    blobs: List[Any] = []  # bytes, or _RegionData

    def blob(data) -> int:
        blobs.append(data)
        return len(blobs) - 1

    def optional(data) -> Optional[int]:
        return None if data is None else blob(data)

    regions = []
    for image in snap.regions:
        data = _RegionData(image)
        regions.append({"gpa": image.gpa, "size": image.size, "readonly": image.readonly,
                        "runs": blob(b"".join(_RUN.pack(*run) for run in data.runs)),
                        "data": blob(data)})
    header: Dict[str, Any] = {
        "format": FORMAT_VERSION,
        "pyvt": _pyvt_version(),
        "structs": struct_sizes(),
        "page_size": PAGE_SIZE,
        "backend": snap.backend,
        "debug_exit_port": snap.debug_exit_port,
        "regions": regions,
        "clock": snap.clock,
        "vcpus": [{
            "index": v.index, "mode": v.mode, "ring": v.ring, "mp_state": v.mp_state,
            "msrs": {str(k): val for k, val in v.msrs.items()},
            "regs": blob(v.regs), "sregs": optional(v.sregs), "sregs2": optional(v.sregs2),
            "fpu": blob(v.fpu), "events": optional(v.events),
            "debugregs": optional(v.debugregs), "cpuid": blob(v.cpuid),
            "xcrs": optional(v.xcrs), "lapic": optional(v.lapic),
            "xsave": optional(v.xsave), "nested": optional(v.nested),
        } for v in snap.vcpus],
        "devices": {name: _encode_state(state, blob) for name, state in snap.devices.items()},
        "irqchip": None if snap.irqchip is None else [blob(c) for c in snap.irqchip],
        "pit": optional(snap.pit),
    }
    header["blobs"] = [b.length if isinstance(b, _RegionData) else len(b) for b in blobs]
    head = json.dumps(header, sort_keys=True).encode()
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            digest = hashlib.sha256()

            def put(part) -> None:
                digest.update(part)
                f.write(part)

            for part in (MAGIC, _PREFIX.pack(FORMAT_VERSION, len(head)), head):
                put(part)
            for b in blobs:
                for part in (b.parts() if isinstance(b, _RegionData) else (b,)):
                    put(part)
            f.write(digest.digest())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # never a half-written file under the real name
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise _file_error(e, "save the snapshot to", path) from None
        raise


def _encode_state(state: Any, blob) -> Any:
    """A device state for the JSON header: bytes become ``{"blob": n}``,
    tuples lists; dicts (str keys), lists, ints, strs, None stay."""
    if isinstance(state, bytes):
        return {"blob": blob(state)}
    if isinstance(state, (list, tuple)):
        return [_encode_state(item, blob) for item in state]
    if isinstance(state, dict):
        if "blob" in state or not all(isinstance(key, str) for key in state):
            raise SnapshotError(f"a device state's dict keys must be strs other than "
                                f"'blob', not {sorted(map(repr, state))}")
        return {key: _encode_state(value, blob) for key, value in state.items()}
    if state is None or isinstance(state, (bool, int, str)):
        return state
    raise SnapshotError(f"a device state cannot hold {type(state).__name__}")


# -- loading -------------------------------------------------------------------------


class _Header:
    """Checks the JSON header field by field; each check names the field."""

    def __init__(self, path: str, blob_lengths: List[int]):
        self.path = path
        self.blob_lengths = blob_lengths

    def fail(self, where: str, what: str) -> NoReturn:
        raise SnapshotError(f"{self.path} is malformed: {where} {what}")

    def fields(self, value, where: str, keys) -> Dict[str, Any]:
        if not isinstance(value, dict):
            self.fail(where, f"is {type(value).__name__}, not an object")
        missing, extra = sorted(set(keys) - set(value)), sorted(set(value) - set(keys))
        if missing:
            self.fail(where, f"lacks the field(s) {', '.join(missing)}")
        if extra:
            self.fail(where, f"has unknown field(s) {', '.join(map(str, extra))}")
        return value

    def array(self, value, where: str, length: Optional[int] = None) -> List[Any]:
        if not isinstance(value, list):
            self.fail(where, f"is {type(value).__name__}, not a list")
        if length is not None and len(value) != length:
            self.fail(where, f"has {len(value)} items, not {length}")
        return value

    def integer(self, value, where: str, low: int = 0, high: int = (1 << 64) - 1) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(where, f"is {value!r}, not an integer")
        if not low <= value <= high:
            self.fail(where, f"is {value:#x}, outside {low:#x}-{high:#x}")
        return value

    def text(self, value, where: str) -> str:
        if not isinstance(value, str):
            self.fail(where, f"is {value!r}, not a string")
        return value

    def flag(self, value, where: str) -> bool:
        if not isinstance(value, bool):
            self.fail(where, f"is {value!r}, not true or false")
        return value

    def blob(self, value, where: str, size: Optional[int] = None) -> int:
        if isinstance(value, bool) or not isinstance(value, int) \
                or not 0 <= value < len(self.blob_lengths):
            self.fail(where, f"names blob {value!r}, but the file has blobs 0-"
                      f"{len(self.blob_lengths) - 1}")
        index = value
        if size is not None and self.blob_lengths[index] != size:
            self.fail(where, f"is {self.blob_lengths[index]} bytes, not {size}")
        return index

    def optional_blob(self, value, where: str, size: Optional[int] = None) -> Optional[int]:
        return None if value is None else self.blob(value, where, size)

    def struct_blob(self, value, where: str, ctype: str, optional: bool = False) -> Optional[int]:
        if optional and value is None:
            return None
        return self.blob(value, where, ffi.sizeof(ctype))


_TOP_FIELDS = ("format", "pyvt", "structs", "page_size", "backend", "debug_exit_port",
               "regions", "clock", "vcpus", "devices", "irqchip", "pit", "blobs")
_REGION_FIELDS = ("gpa", "size", "readonly", "runs", "data")
_VCPU_FIELDS = ("index", "mode", "ring", "mp_state", "msrs", "regs", "sregs", "sregs2", "fpu",
                "events", "debugregs", "cpuid", "xcrs", "lapic", "xsave", "nested")


class _Reader:
    """Reads exactly what is asked from the open file, or fails clearly."""

    def __init__(self, fd: int, path: str):
        self.fd, self.path = fd, path

    def read(self, offset: int, length: int) -> bytes:
        parts, done = [], 0
        while done < length:
            try:
                part = os.pread(self.fd, min(length - done, _CHUNK), offset + done)
            except OSError as e:
                raise _file_error(e, "read", self.path) from None
            if not part:
                raise SnapshotError(f"{self.path} is truncated: it changed while being read")
            parts.append(part)
            done += len(part)
        return b"".join(parts)


def load(path):
    """Reads, checks and returns the snapshot in ``path`` (a
    :class:`pyvt.Snapshot`; :meth:`pyvt.Snapshot.load` also checks CPUID)."""
    path = _as_path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise _file_error(e, "open", path) from None
    try:
        return _load(_Reader(fd, path), path, os.fstat(fd))
    finally:
        os.close(fd)


def _load(reader: _Reader, path: str, info: os.stat_result):
    if not stat.S_ISREG(info.st_mode):
        raise SnapshotError(f"{path} is not a regular file")
    size = info.st_size
    start = len(MAGIC) + _PREFIX.size
    if reader.read(0, min(size, len(MAGIC))) != MAGIC:
        raise SnapshotError(f"{path} is not a pyvt snapshot")
    if size < start + _DIGEST:
        raise SnapshotError(f"{path} is truncated")
    version, head_len = _PREFIX.unpack(reader.read(len(MAGIC), _PREFIX.size))
    if version < FORMAT_VERSION:
        raise SnapshotError(f"{path}: snapshot file format {version} is from an older pyvt; "
                            f"this pyvt ({_pyvt_version()}) reads format {FORMAT_VERSION}: "
                            "take the snapshot again")
    if version != FORMAT_VERSION:
        raise SnapshotError(f"{path}: snapshot file format {version} is from a newer pyvt; "
                            f"this pyvt ({_pyvt_version()}) reads format {FORMAT_VERSION}: "
                            "load it with a pyvt that reads it")
    body = size - _DIGEST
    digest = hashlib.sha256()
    for at in range(0, body, _CHUNK):
        digest.update(reader.read(at, min(_CHUNK, body - at)))
    if digest.digest() != reader.read(body, _DIGEST):
        raise SnapshotError(f"{path} is corrupted or truncated: its checksum does not match")
    if head_len > body - start:
        raise SnapshotError(f"{path} is malformed: its header runs past the end")
    try:
        header = json.loads(reader.read(start, head_len))
    except (ValueError, RecursionError) as e:
        raise SnapshotError(f"{path} is malformed: its header is not JSON ({e})") from None
    check = _Header(path, [])
    header = check.fields(header, "the header", _TOP_FIELDS)
    lengths = [check.integer(n, f"blobs[{i}]", 0, body) for i, n in
               enumerate(check.array(header["blobs"], "blobs"))]
    offsets, at = [], start + head_len
    for length in lengths:
        offsets.append(at)
        at += length
    if at != body:
        raise SnapshotError(f"{path} is malformed: its blobs do not add up")
    check.blob_lengths = lengths
    _check_header(check, header)

    def get(index: Optional[int]) -> Optional[bytes]:
        return None if index is None else reader.read(offsets[index], lengths[index])

    images: List[RegionImage] = []
    try:
        for i, r in enumerate(header["regions"]):
            image = new_image(r["gpa"], r["size"], r["readonly"])
            images.append(image)
            runs = _runs(check, get(r["runs"]), image.pages, f"regions[{i}].runs")
            _load_pages(reader, image, runs, offsets[r["data"]], lengths[r["data"]],
                        check, f"regions[{i}].data")
        snap = _snapshot(header, images, get, _device_states(check, header, get))
        _check_contents(check, snap)
        return snap
    except BaseException:
        for image in images:
            image.close()
        raise


def _runs(check: _Header, raw, pages: int, where: str) -> pageset.Runs:
    runs, end = [], 0
    for first, count in _RUN.iter_unpack(raw):
        if count < 1 or first < end or first + count > pages:
            check.fail(where, f"holds the page run {first:#x}+{count:#x}, which is empty, "
                       f"out of order or beyond the region's {pages:#x} pages")
        runs.append((first, count))
        end = first + count
    return runs


def _load_pages(reader: _Reader, image: RegionImage, runs, offset: int, length: int,
                check: _Header, where: str) -> None:
    if length != sum(count for _, count in runs) * PAGE_SIZE:
        check.fail(where, f"is {length} bytes, not the {len(runs)} page runs' size")
    at = offset
    for first, count in runs:  # a chunk at a time: memory stays bounded
        for page in range(first, first + count, _CHUNK // PAGE_SIZE):
            n = min(_CHUNK // PAGE_SIZE, first + count - page)
            write_pages(image, page, reader.read(at, n * PAGE_SIZE))
            at += n * PAGE_SIZE
    image.data = pageset.from_runs(runs, image.pages)


def _check_header(check: _Header, header: Dict[str, Any]) -> None:
    """Refuses a header that is not exactly what save() writes."""
    path = check.path
    check.integer(header["format"], "format", FORMAT_VERSION, FORMAT_VERSION)
    check.text(header["pyvt"], "pyvt")
    if header["structs"] != struct_sizes() or header["page_size"] != PAGE_SIZE:
        raise SnapshotError(f"{path} was made by a pyvt built against other kernel headers "
                            f"(pyvt {header['pyvt']}); the register layouts differ")
    check.text(header["backend"], "backend")
    if header["debug_exit_port"] is not None:
        check.integer(header["debug_exit_port"], "debug_exit_port", 0,
                  0x10000 - _native.DEBUG_EXIT_PORT_COUNT)

    if header["clock"] is not None:
        check.integer(header["clock"], "clock")

    regions = check.array(header["regions"], "regions")
    if not regions:
        check.fail("regions", "is empty: a VM has guest RAM at 0")
    end = 0
    for i, r in enumerate(regions):
        where = f"regions[{i}]"
        check.fields(r, where, _REGION_FIELDS)
        gpa = check.integer(r["gpa"], f"{where}.gpa", 0, MAX_PHYSICAL_ADDRESS - PAGE_SIZE)
        size = check.integer(r["size"], f"{where}.size", PAGE_SIZE, MAX_PHYSICAL_ADDRESS - gpa)
        readonly = check.flag(r["readonly"], f"{where}.readonly")
        if gpa % PAGE_SIZE or size % PAGE_SIZE:
            check.fail(where, f"({gpa:#x}, {size:#x} bytes) is not page-aligned")
        if i == 0 and (gpa != 0 or readonly):
            check.fail(where, "is not guest RAM at 0, writable")
        if gpa < end:
            check.fail(where, f"at {gpa:#x} overlaps the region before it or is out of order")
        end = gpa + size
        check.blob(r["runs"], f"{where}.runs")
        if check.blob_lengths[r["runs"]] % _RUN.size:
            check.fail(f"{where}.runs", f"is not a list of {_RUN.size}-byte page runs")
        check.blob(r["data"], f"{where}.data")

    has_irqchip = header["irqchip"] is not None
    if has_irqchip:
        chips = check.array(header["irqchip"], "irqchip", len(IRQCHIPS))
        for i, chip in enumerate(chips):
            check.struct_blob(chip, f"irqchip[{i}]", "struct kvm_irqchip")
    if header["pit"] is not None:
        if not has_irqchip:
            check.fail("pit", "is there without the in-kernel irqchip it needs")
        check.struct_blob(header["pit"], "pit", "struct kvm_pit_state2")

    indices = set()
    for i, v in enumerate(check.array(header["vcpus"], "vcpus")):
        where = f"vcpus[{i}]"
        check.fields(v, where, _VCPU_FIELDS)
        index = check.integer(v["index"], f"{where}.index", 0, (1 << 32) - 1)
        if index in indices:
            check.fail(f"{where}.index", f"{index} is there twice")
        indices.add(index)
        if v["mode"] not in modes.MODES:
            check.fail(f"{where}.mode", f"is {v['mode']!r}, not one of {modes.MODES}")
        if isinstance(v["ring"], bool) or v["ring"] not in modes.RINGS or (
                v["ring"] == 3 and v["mode"] != "long"):
            check.fail(f"{where}.ring", f"is {v['ring']!r}, not 0 or 3 (3 in long mode only)")
        if v["mp_state"] is not None:
            check.integer(v["mp_state"], f"{where}.mp_state", 0, (1 << 32) - 1)
        if not isinstance(v["msrs"], dict):
            check.fail(f"{where}.msrs", "is not an object")
        for key, value in v["msrs"].items():
            if not (key.isascii() and key.isdigit()) or int(key) >= 1 << 32:
                check.fail(f"{where}.msrs", f"has the index {key!r}, not a u32 in decimal")
            check.integer(value, f"{where}.msrs[{key}]")
        for name, ctype, optional in (("regs", "struct kvm_regs", False),
                                      ("sregs", "struct kvm_sregs", True),
                                      ("sregs2", "struct kvm_sregs2", True),
                                      ("fpu", "struct kvm_fpu", False),
                                      ("events", "struct kvm_vcpu_events", True),
                                      ("debugregs", "struct kvm_debugregs", True),
                                      ("xcrs", "struct kvm_xcrs", True),
                                      ("lapic", "struct kvm_lapic_state", True)):
            check.struct_blob(v[name], f"{where}.{name}", ctype, optional)
        if (v["sregs"] is None) == (v["sregs2"] is None):
            check.fail(f"{where}.sregs", "and sregs2: exactly one must be there")
        if v["nested"] is not None:
            nested = check.blob(v["nested"], f"{where}.nested")
            if check.blob_lengths[nested] < ffi.sizeof("struct kvm_nested_state"):
                check.fail(f"{where}.nested", f"is {check.blob_lengths[nested]} bytes, "
                           "shorter than struct kvm_nested_state")
        if (v["lapic"] is not None) != has_irqchip:
            check.fail(f"{where}.lapic", "must be there exactly when the irqchip is")
        if v["xsave"] is not None:
            xsave = check.blob(v["xsave"], f"{where}.xsave")
            length = check.blob_lengths[xsave]
            if not ffi.sizeof("struct kvm_xsave") <= length <= MAX_XSAVE_SIZE or length % 64:
                check.fail(f"{where}.xsave", f"is {length} bytes, not an XSAVE area")
        cpuid = check.blob(v["cpuid"], f"{where}.cpuid")
        entries, extra = divmod(check.blob_lengths[cpuid] - ffi.sizeof("struct kvm_cpuid2"),
                                ffi.sizeof("struct kvm_cpuid_entry2"))
        if entries < 0 or extra or entries > MAX_CPUID_ENTRIES:
            check.fail(f"{where}.cpuid", f"is {check.blob_lengths[cpuid]} bytes, not a CPUID table")

    _check_device_names(check, header["devices"])
    for name, state in header["devices"].items():
        _check_state_blobs(check, state, f"devices.{name}")


def _check_device_names(check: _Header, devices) -> None:
    """Every device a VM always has, and the PC devices all or none."""
    stateful = device_model.stateful()
    names = {d.name for d in stateful if not d.pc}
    if isinstance(devices, dict) and any(d.name in devices for d in stateful if d.pc):
        names |= {d.name for d in stateful if d.pc}
    check.fields(devices, "devices", names)


def _check_state_blobs(check: _Header, value, where: str) -> None:
    """Checks the blob numbers of an encoded device state (see
    _encode_state); its shape is the device's to check, once decoded."""
    if isinstance(value, dict) and "blob" in value:
        check.fields(value, where, ("blob",))
        check.blob(value["blob"], where)
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_state_blobs(check, item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_state_blobs(check, item, f"{where}[{i}]")
    elif not (value is None or isinstance(value, (bool, int, str))):
        check.fail(where, f"is {value!r}, not part of a device state")


def _decode_state(value, get) -> Any:
    if isinstance(value, dict) and "blob" in value:
        return get(value["blob"])
    if isinstance(value, dict):
        return {key: _decode_state(item, get) for key, item in value.items()}
    if isinstance(value, list):
        return [_decode_state(item, get) for item in value]
    return value


def _device_states(check: _Header, header: Dict[str, Any], get) -> Dict[str, Any]:
    """The devices' states, each checked by its device's descriptor."""
    states = {}
    for name, value in header["devices"].items():
        try:
            states[name] = device_model.by_name(name).check_state(_decode_state(value, get))
        except DeviceStateError as e:
            check.fail(f"devices.{name}", f"is not the {name} device's state: {e}")
    return states


def _check_contents(check: _Header, snap) -> None:
    """The few checks that need a blob's bytes, not just its size."""
    for i, chip in enumerate(snap.irqchip or ()):
        (chip_id,) = struct.unpack_from("<I", chip)
        if chip_id != getattr(lib, IRQCHIPS[i]):
            check.fail(f"irqchip[{i}]", f"is chip {chip_id}, not {IRQCHIPS[i]}")
    entry = ffi.sizeof("struct kvm_cpuid_entry2")
    for i, vcpu in enumerate(snap.vcpus):
        (nent,) = struct.unpack_from("<I", vcpu.cpuid)
        if nent * entry + ffi.sizeof("struct kvm_cpuid2") != len(vcpu.cpuid):
            check.fail(f"vcpus[{i}].cpuid", f"says {nent} entries in {len(vcpu.cpuid)} bytes")


def _snapshot(header: Dict[str, Any], images: List[RegionImage], get,
              devices: Dict[str, Any]):
    """The Snapshot a checked header describes."""
    from .snapshot import Snapshot

    vcpus = [VcpuState(index=v["index"], mode=v["mode"], ring=v["ring"], regs=get(v["regs"]),
                       sregs=get(v["sregs"]), sregs2=get(v["sregs2"]), fpu=get(v["fpu"]),
                       events=get(v["events"]), debugregs=get(v["debugregs"]),
                       mp_state=v["mp_state"], cpuid=get(v["cpuid"]),
                       msrs={int(k): val for k, val in v["msrs"].items()},
                       xcrs=get(v["xcrs"]), lapic=get(v["lapic"]), xsave=get(v["xsave"]),
                       nested=get(v["nested"]))
             for v in header["vcpus"]]
    return Snapshot(backend=header["backend"], regions=images, vcpus=vcpus, devices=devices,
                    irqchip=None if header["irqchip"] is None
                    else [get(i) for i in header["irqchip"]],
                    pit=get(header["pit"]), debug_exit_port=header["debug_exit_port"],
                    clock=header["clock"])
