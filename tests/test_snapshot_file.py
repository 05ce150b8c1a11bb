"""Snapshot files and snapshot failures: every error is a SnapshotError (a
pyvt.Error) saying what is wrong, and a failed save leaves nothing behind."""

import hashlib
import json
import os
import resource
import signal
import struct

import pytest

import pyvt
from pyvt.snapshot import (
    FORMAT_VERSION,
    MAGIC,
    Snapshot,
    SnapshotError,
    SnapshotFileError,
    SnapshotFileNotFound,
)

pytestmark = pytest.mark.requires_kvm
#: good_file has every part of the format, the in-kernel irqchip and PIT too.
needs_good_file = pytest.mark.requires_cap("IRQCHIP", "PIT2")


@pytest.fixture(scope="module")
def good_file(tmp_path_factory):
    """A saved snapshot with an irqchip, PIT, LAPICs, fw_cfg items and files:
    every part of the format."""
    path = tmp_path_factory.mktemp("snap") / "good.snap"
    with pyvt.Vm("16M") as vm:
        vm.fd.create_irqchip()
        vm.fd.create_pit2()
        vm.fw_cfg.add_file("opt/pyvt/test", b"data")
        vm.memory.add_region(0x2000000, "1M", readonly=True)
        vm.memory.write(0x2000000, b"ROM")
        vm.vcpu(0, mode="long")
        vm.vcpu(1, mode="real")
        vm.snapshot().save(str(path))
    return path


def _parts(path):
    raw = path.read_bytes()
    version, head_len = struct.unpack_from("<II", raw, len(MAGIC))
    start = len(MAGIC) + 8
    header = json.loads(raw[start:start + head_len])
    blobs, at = [], start + head_len
    for length in header["blobs"]:
        blobs.append(raw[at:at + length])
        at += length
    return header, blobs


def _write(path, head: bytes, blobs, version=FORMAT_VERSION):
    body = MAGIC + struct.pack("<II", version, len(head)) + head + b"".join(blobs)
    path.write_bytes(body + hashlib.sha256(body).digest())
    return str(path)


def _craft(good_file, tmp_path, mutate):
    """good_file with its header (and blobs) changed by ``mutate(header,
    blobs)``, blob lengths recomputed unless it set them, checksum valid."""
    header, blobs = _parts(good_file)
    lengths = header["blobs"]
    mutate(header, blobs)
    if header.get("blobs") is lengths:
        header["blobs"] = [len(b) for b in blobs]
    return _write(tmp_path / "crafted.snap", json.dumps(header).encode(), blobs)


def _vcpu(name, value):
    return lambda h, b: h["vcpus"][0].__setitem__(name, value)


def _blob_of(field_path, data):
    """Replaces the bytes of the blob a field names."""
    def mutate(h, b):
        node = h
        for key in field_path[:-1]:
            node = node[key]
        b[node[field_path[-1]]] = data
    return mutate


BAD_HEADERS = [
    ("no regions", lambda h, b: h.pop("regions"), "lacks the field"),
    ("unknown field", lambda h, b: h.__setitem__("extra", 1), "unknown field"),
    ("empty header", lambda h, b: h.clear(), "lacks the field"),
    ("blob 999", _vcpu("regs", 999), "names blob 999"),
    ("blob -1", _vcpu("regs", -1), "names blob -1"),
    ("blob as text", _vcpu("regs", "3"), "names blob '3'"),
    ("blob as true", _vcpu("regs", True), "names blob True"),
    ("regs is sregs", lambda h, b: h["vcpus"][0].__setitem__(
        "regs", h["vcpus"][0]["sregs"] if h["vcpus"][0]["sregs"] is not None
        else h["vcpus"][0]["sregs2"]), "regs is .* bytes, not"),
    ("no sregs", lambda h, b: h["vcpus"][0].update(sregs=None, sregs2=None), "exactly one"),
    ("sregs twice", lambda h, b: h["vcpus"][0].update(
        sregs=h["vcpus"][0]["sregs"] or 0, sregs2=h["vcpus"][0]["sregs2"] or 0), "exactly one|is .* bytes"),
    ("clock as text", lambda h, b: h.__setitem__("clock", "now"), "clock is 'now'"),
    ("short nested state", lambda h, b: h["vcpus"][0].__setitem__("nested", h["regions"][1]["runs"]),
     "shorter than struct kvm_nested_state"),
    ("short fpu", _blob_of(("vcpus", 0, "fpu"), b"x"), "fpu is 1 bytes"),
    ("short lapic", _blob_of(("vcpus", 0, "lapic"), b"x" * 10), "lapic is 10 bytes"),
    ("lapic without irqchip", lambda h, b: h.update(irqchip=None, pit=None), "lapic must be"),
    ("pit without irqchip", lambda h, b: h.update(irqchip=None) or
     [v.__setitem__("lapic", None) for v in h["vcpus"]], "without the in-kernel irqchip"),
    ("two irqchips", lambda h, b: h["irqchip"].pop(), "has 2 items, not 3"),
    ("swapped irqchips", lambda h, b: h["irqchip"].reverse(), "is chip 2, not"),
    ("odd xsave", _blob_of(("vcpus", 0, "xsave"), bytes(4100)), "not an XSAVE area"),
    ("cpuid size", _blob_of(("vcpus", 0, "cpuid"), bytes(13)), "not a CPUID table"),
    ("cpuid count", _blob_of(("vcpus", 0, "cpuid"), struct.pack("<II", 5, 0)), "says 5 entries"),
    ("mode", _vcpu("mode", "virtual-8086"), "mode is 'virtual-8086'"),
    ("ring 1", _vcpu("ring", 1), "ring is 1, not 0 or 3"),
    ("ring as bool", _vcpu("ring", True), "ring is True"),
    ("ring 3 in real mode", lambda h, b: h["vcpus"][0].update(mode="real", ring=3),
     "ring is 3, not 0 or 3 \\(3 in long mode only\\)"),
    ("index twice", lambda h, b: h["vcpus"][1].__setitem__("index", 0), "is there twice"),
    ("index as float", _vcpu("index", 0.0), "not an integer"),
    ("huge mp_state", _vcpu("mp_state", 1 << 70), "outside"),
    ("msr index", _vcpu("msrs", {"x10": 1}), "not a u32 in decimal"),
    ("msr value", _vcpu("msrs", {"16": -1}), "outside"),
    ("msrs a list", _vcpu("msrs", []), "msrs is not an object"),
    ("region size 0", lambda h, b: h["regions"][0].__setitem__("size", 0), "size is 0x0"),
    ("region size huge", lambda h, b: h["regions"][0].__setitem__("size", 1 << 80), "outside"),
    ("region unaligned", lambda h, b: h["regions"][1].__setitem__("gpa", 0x2000001),
     "not page-aligned"),
    ("RAM not at 0", lambda h, b: h["regions"][0].__setitem__("gpa", 0x1000), "not guest RAM at 0"),
    ("readonly RAM", lambda h, b: h["regions"][0].__setitem__("readonly", True), "not guest RAM at 0"),
    ("readonly as 1", lambda h, b: h["regions"][1].__setitem__("readonly", 1), "not true or false"),
    ("overlap", lambda h, b: h["regions"][1].__setitem__("gpa", 0x800000), "overlaps"),
    ("no regions listed", lambda h, b: h.__setitem__("regions", []), "is empty"),
    ("runs past the region", _blob_of(("regions", 1, "runs"), struct.pack("<QQ", 255, 2)),
     "beyond the region"),
    ("runs out of order", _blob_of(("regions", 1, "runs"), struct.pack("<QQQQ", 5, 1, 2, 1)),
     "out of order"),
    ("empty run", _blob_of(("regions", 1, "runs"), struct.pack("<QQ", 5, 0)), "empty"),
    ("runs not pairs", _blob_of(("regions", 1, "runs"), bytes(12)), "page runs"),
    ("data size", _blob_of(("regions", 1, "data"), bytes(10)), "not the 1 page runs' size"),
    ("no console", lambda h, b: h["devices"].pop("console"), "lacks the field"),
    ("console without output", lambda h, b: h["devices"]["console"].pop("output"),
     "console device's state: lacks the field"),
    ("console registers size", _blob_of(("devices", "console", "registers", "blob"), b"abc"),
     "console device's state: registers is 3 bytes"),
    ("half the PC devices", lambda h, b: h["devices"].pop("cmos"), "lacks the field.*cmos"),
    ("unknown device", lambda h, b: h["devices"].__setitem__("pm_timer", None),
     "unknown field.*pm_timer"),
    ("debug port", lambda h, b: h.__setitem__("debug_exit_port", 0x10000), "outside"),
    ("backend", lambda h, b: h.__setitem__("backend", 7), "not a string"),
    ("fw_cfg item key", lambda h, b: h["devices"]["fw_cfg"]["items"][0].__setitem__(0, 0x19),
     "file directory"),
    ("fw_cfg file key", lambda h, b: h["devices"]["fw_cfg"]["files"][0].__setitem__(0, 5),
     "outside"),
    ("fw_cfg file name", lambda h, b: h["devices"]["fw_cfg"]["files"][0].__setitem__(1, "a\0b"),
     "not a fw_cfg file name"),
    ("fw_cfg position", lambda h, b: h["devices"]["fw_cfg"].__setitem__("position", [1]),
     "has 1 items, not 2"),
    ("cmos", lambda h, b: h["devices"].__setitem__("cmos", {"blob": "x"}), "names blob 'x'"),
    ("cmos not bytes", lambda h, b: h["devices"].__setitem__("cmos", 7),
     "not the cmos device's state: registers is int, not bytes"),
    ("i8042 size", _blob_of(("devices", "i8042", "blob"), b"x"),
     "not the i8042 device's state: registers is 1 bytes"),
    ("blob lengths", lambda h, b: h.__setitem__("blobs", [1] * len(b)), "do not add up"),
    ("blob length text", lambda h, b: h.__setitem__("blobs", ["1"] + [len(x) for x in b[1:]]),
     "not an integer"),
    ("other structs", lambda h, b: h["structs"].__setitem__("struct kvm_regs", 1),
     "other kernel headers"),
    ("page size", lambda h, b: h.__setitem__("page_size", 8192), "other kernel headers"),
]


@needs_good_file
@pytest.mark.parametrize("name,mutate,message", BAD_HEADERS, ids=[c[0] for c in BAD_HEADERS])
def test_crafted_headers_are_refused(good_file, tmp_path, name, mutate, message):
    """A valid checksum over a header save() would never write: refused by
    load() with a SnapshotError naming the field, nothing else escapes."""
    path = _craft(good_file, tmp_path, mutate)
    with pytest.raises(SnapshotError, match=message):
        Snapshot.load(path)


@pytest.mark.parametrize("head", [b"{not json", b"\xff\xfe", b"[1, 2]", b"[" * 100000 + b"]" * 100000,
                                  b'{"format": NaN}'])
@needs_good_file
def test_headers_that_are_not_json_objects(good_file, tmp_path, head):
    path = _write(tmp_path / "bad.snap", head, [])
    with pytest.raises(SnapshotError, match="malformed"):
        Snapshot.load(path)


@needs_good_file
def test_the_untouched_file_loads_and_clones(good_file, tmp_path):
    """The crafting above changes only what each case names."""
    path = _craft(good_file, tmp_path, lambda h, b: None)
    snap = Snapshot.load(path)
    with pyvt.Vm.from_snapshot(snap) as clone:
        assert clone.memory.read(0x2000000, 3) == b"ROM"
        assert sorted(clone.vcpus) == [0, 1]


@pytest.mark.parametrize("mutate,message", [
    # The right size, but more input queued than the UART's FIFO holds
    # (struct pvt_uart_state: seven u8 registers, then the u32 rx_count).
    (_blob_of(("devices", "console", "registers", "blob"),
              bytes(8) + b"\xff" * 4 + bytes(pyvt._native.Uart.STATE_SIZE - 12)),
     "console device's state: the UART state holds more input"),
    (_blob_of(("vcpus", 0, "xsave"), bytes(1 << 16)), "XSAVE area is 65536 bytes"),
    (_vcpu("index", 1 << 20), "vCPU index"),
])
@needs_good_file
def test_inconsistent_contents_are_refused_by_from_snapshot(good_file, tmp_path, mutate, message):
    """What only the kernel or a device can judge fails when the snapshot is
    used, still as a pyvt.Error, and leaves no VM behind."""
    snap = Snapshot.load(_craft(good_file, tmp_path, mutate))
    with pytest.raises(pyvt.Error, match=message):
        pyvt.Vm.from_snapshot(snap)


@needs_good_file
def test_other_format_versions_are_refused(good_file, tmp_path):
    header, blobs = _parts(good_file)
    assert FORMAT_VERSION == 4
    for version in (1, 2, 3):
        path = _write(tmp_path / "v.snap", json.dumps(header).encode(), blobs, version)
        with pytest.raises(SnapshotError,
                           match=f"snapshot file format {version} is from an older pyvt; this "
                                 r"pyvt \(.*\) reads format 4: take the snapshot again"):
            Snapshot.load(path)
    path = _write(tmp_path / "v.snap", json.dumps(header).encode(), blobs, FORMAT_VERSION + 1)
    with pytest.raises(SnapshotError, match="format 5 is from a newer pyvt; .* reads format 4"):
        Snapshot.load(path)


def test_files_that_cannot_be_read(tmp_path):
    missing = tmp_path / "missing.snap"
    with pytest.raises(SnapshotFileNotFound, match="missing.snap") as caught:
        Snapshot.load(str(missing))
    assert isinstance(caught.value, FileNotFoundError) and isinstance(caught.value, pyvt.Error)
    assert caught.value.filename == str(missing)
    with pytest.raises(SnapshotError, match="not a regular file"):
        Snapshot.load(str(tmp_path))
    with pytest.raises(pyvt.ArgumentError):
        Snapshot.load(42)


def test_failed_saves_leave_nothing_behind(vm, tmp_path):
    vm.vcpu(0, mode="long")
    snap = vm.snapshot()
    target = tmp_path / "a-directory"
    target.mkdir()
    with pytest.raises(SnapshotFileError, match="Is a directory") as caught:
        snap.save(str(target))
    assert isinstance(caught.value, OSError)
    with pytest.raises(SnapshotFileNotFound):
        snap.save(str(tmp_path / "no-such-dir" / "x.snap"))
    # A write that fails half-way (the file-size limit, here).
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20000, limits[1]))
    try:
        with pytest.raises(SnapshotFileError, match="File too large"):
            snap.save(str(tmp_path / "big.snap"))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-directory"]
    assert list(target.iterdir()) == []
    snap.save(str(tmp_path / "fine.snap"))  # and the snapshot still saves


def test_closed_snapshots(vm, tmp_path):
    vm.vcpu(0, mode="long")
    snap = vm.snapshot()
    snap.close()
    for use in (lambda: snap.save(str(tmp_path / "x.snap")), lambda: vm.restore(snap),
                lambda: pyvt.Vm.from_snapshot(snap), lambda: snap.regions[0].read(0, 1)):
        with pytest.raises(SnapshotError, match="closed"):
            use()
    assert not list(tmp_path.iterdir())
    assert "closed" in repr(snap)


def _lowest_free_fd() -> int:
    fd = os.dup(0)
    os.close(fd)
    return fd


def test_open_file_limit_during_a_snapshot(vm):
    """Each snapshot region is a memfd: at the open-file limit, snapshot()
    says so (and what to do), leaks nothing, and works once fds are free."""
    vm.memory.add_region(0x2000000, "1M")
    vm.vcpu(0, mode="long")
    before = len(os.listdir("/proc/self/fd"))
    limits = resource.getrlimit(resource.RLIMIT_NOFILE)
    for room in (0, 1):  # no fd at all; one region's fd, not the second's
        resource.setrlimit(resource.RLIMIT_NOFILE, (_lowest_free_fd() + room, limits[1]))
        try:
            with pytest.raises(SnapshotError, match="open-file limit"):
                vm.snapshot()
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, limits)
        assert len(os.listdir("/proc/self/fd")) == before
    vm.snapshot().close()
