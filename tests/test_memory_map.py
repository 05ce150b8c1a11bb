"""Zero-copy host memory: vm.memory.map() of mmaps, page-aligned buffers and
files, vm.memory.remove_region(), and how they meet the rest of pyvt
(MMIO handlers, the dirty log, snapshots, clones, close)."""

import ctypes
import mmap
import os
import threading
import time

import pytest

import pyvt
from pyvt import exits
from pyvt.snapshot import Snapshot

pytestmark = pytest.mark.requires_kvm

PAGE = mmap.PAGESIZE
MAPPED = 0x4000000  # above the 16 MiB of RAM, inside the identity-mapped 4 GiB
OTHER = 0x5000000

# Reads [rdi] into rax, writes rbx to [rdi + 8], stops.
PEEK_POKE = pyvt.assemble("""
    .code64
    .globl _start
_start:
    mov (%rdi), %rax
    mov %rbx, 8(%rdi)
    hlt
""")


def _machine(vm):
    vm.memory.write(0x1000, PEEK_POKE)
    return vm.vcpu(0, mode="long")


def _peek_poke(cpu, address, value):
    """Runs the guest on ``address``: returns the exit and what it read."""
    cpu.regs.rip, cpu.regs.rdi, cpu.regs.rbx = 0x1000, address, value
    exit = cpu.run(timeout=10)
    return exit, cpu.regs.rax


def _u64(buffer, offset):
    return int.from_bytes(bytes(buffer[offset:offset + 8]), "little")


def _put_u64(buffer, offset, value):
    buffer[offset:offset + 8] = value.to_bytes(8, "little")


def _exports_released(mm):
    """pyvt holds no buffer export of ``mm`` any more: it can be resized."""
    size = len(mm)
    mm.resize(size + PAGE)
    mm.resize(size)
    return True


# -- the guest and the host share the memory ----------------------------------------


def test_guest_and_host_share_an_mmap(vm):
    cpu = _machine(vm)
    mm = mmap.mmap(-1, 4 * PAGE)
    _put_u64(mm, 0, 0x1122334455667788)
    region = vm.memory.map(MAPPED, mm)
    assert (region.gpa, region.size, region.readonly, region.source) == (MAPPED, 4 * PAGE, False, mm)
    assert region in vm.memory.regions and "maps a mmap" in repr(region)

    exit, seen = _peek_poke(cpu, MAPPED, 0xDEADBEEF)
    assert isinstance(exit, exits.Hlt) and seen == 0x1122334455667788
    assert _u64(mm, 8) == 0xDEADBEEF  # the guest's write, in the host object at once

    _put_u64(mm, 2 * PAGE, 0xCAFE)  # the host's write, seen by the guest
    exit, seen = _peek_poke(cpu, MAPPED + 2 * PAGE, 7)
    assert seen == 0xCAFE and _u64(mm, 2 * PAGE + 8) == 7

    # vm.memory.read/write go through to the object, across regions.
    vm.memory.write(MAPPED + PAGE, b"host")
    assert mm[PAGE:PAGE + 4] == b"host"
    assert vm.memory.read(MAPPED + 8, 8) == (0xDEADBEEF).to_bytes(8, "little")
    vm.memory.map(MAPPED + 4 * PAGE, mmap.mmap(-1, PAGE))
    vm.memory.write(MAPPED + 4 * PAGE - 2, b"abcd")  # across two mapped regions
    assert mm[-2:] == b"ab" and vm.memory.read(MAPPED + 4 * PAGE - 2, 4) == b"abcd"


def test_ctypes_and_multidimensional_buffers(vm):
    """Any C-contiguous buffer whose memory is page-aligned maps: here a
    ctypes array and a 2-D array (a memoryview cast to 32x32 u32, the
    buffer shape numpy arrays export) over an mmap, and memory from
    posix_memalign.  The guest sees them with their own layout in bytes."""
    cpu = _machine(vm)
    backing = mmap.mmap(-1, 2 * PAGE)
    array = (ctypes.c_uint64 * (PAGE // 8)).from_buffer(backing)
    array[0] = 41
    vm.memory.map(MAPPED, array)
    assert _peek_poke(cpu, MAPPED, 42)[1] == 41 and array[1] == 42

    grid = memoryview(backing)[PAGE:].cast("I", shape=[32, 32])
    assert (grid.ndim, grid.c_contiguous) == (2, True)
    grid[0, 0] = 0x77
    vm.memory.map(OTHER, grid)
    assert _peek_poke(cpu, OTHER, 0x100000002)[1] == 0x77
    assert (grid[0, 2], grid[0, 3]) == (2, 1)

    libc = ctypes.CDLL(None)
    pointer = ctypes.c_void_p()
    assert libc.posix_memalign(ctypes.byref(pointer), PAGE, PAGE) == 0
    try:
        aligned = (ctypes.c_char * PAGE).from_address(pointer.value)
        region = vm.memory.map(OTHER + PAGE, aligned)
        assert region.host_address == pointer.value
        _peek_poke(cpu, OTHER + PAGE, 0x55)
        assert aligned.raw[8] == 0x55
        vm.memory.remove_region(OTHER + PAGE)  # before the memory is freed
    finally:
        libc.free(pointer)
    del array, grid
    vm.memory.remove_region(MAPPED)
    vm.memory.remove_region(OTHER)
    backing.close()  # nothing exports it any more


def test_a_mapped_object_cannot_be_resized_or_closed_under_the_guest(vm):
    mm = mmap.mmap(-1, PAGE)
    vm.memory.map(MAPPED, mm)
    with pytest.raises(BufferError):
        mm.resize(2 * PAGE)
    with pytest.raises(BufferError):
        mm.close()
    vm.memory.remove_region(MAPPED)
    assert _exports_released(mm)
    mm.close()


def test_a_file_descriptor_maps_the_file_shared(vm, tmp_path):
    cpu = _machine(vm)
    path = tmp_path / "shared.bin"
    path.write_bytes(bytes(3 * PAGE))
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, (0x600D).to_bytes(8, "little"), 0)
        region = vm.memory.map(MAPPED, fd)  # an int: the whole file
        assert region.size == 3 * PAGE
        exit, seen = _peek_poke(cpu, MAPPED, 0xF11E)
        assert seen == 0x600D
        assert int.from_bytes(os.pread(fd, 8, 8), "little") == 0xF11E  # in the file
        os.pwrite(fd, (0xBEEF).to_bytes(8, "little"), PAGE)
        assert _peek_poke(cpu, MAPPED + PAGE, 0)[1] == 0xBEEF

        # A file object, a part of it (size=, offset=).
        with open(path, "r+b") as f:
            part = vm.memory.map(OTHER, f, size=PAGE, offset=2 * PAGE)
            assert part.size == PAGE
            _peek_poke(cpu, OTHER, 0x5EC0)
        assert int.from_bytes(os.pread(fd, 8, 2 * PAGE + 8), "little") == 0x5EC0
        assert _peek_poke(cpu, OTHER, 0)[1] == 0  # still mapped after the user's close

        vm.memory.remove_region(MAPPED)
        vm.close()
        os.fstat(fd)  # pyvt never closes the user's descriptor
    finally:
        os.close(fd)
    assert path.read_bytes()[8:16] == (0xF11E).to_bytes(8, "little")


def test_a_file_shorter_than_the_mapping_is_refused(vm, tmp_path):
    path = tmp_path / "short.bin"
    path.write_bytes(bytes(PAGE))
    with open(path, "r+b") as f:
        with pytest.raises(pyvt.MemoryConfigError, match="shorter than offset \\+ size.*ftruncate"):
            vm.memory.map(MAPPED, f, size=2 * PAGE)
        with pytest.raises(pyvt.MemoryConfigError, match="nothing to map"):
            vm.memory.map(MAPPED, f, offset=PAGE)
        os.ftruncate(f.fileno(), 2 * PAGE)
        assert vm.memory.map(MAPPED, f, size=2 * PAGE).size == 2 * PAGE
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    with open(empty, "r+b") as f:
        with pytest.raises(pyvt.MemoryConfigError, match="nothing to map"):
            vm.memory.map(OTHER, f)


def test_a_read_only_file_maps_read_only(vm, tmp_path):
    cpu = _machine(vm)
    path = tmp_path / "rom.bin"
    path.write_bytes((0x40).to_bytes(8, "little") + bytes(PAGE - 8))
    with open(path, "rb") as f:
        with pytest.raises(pyvt.MemoryConfigError, match="readonly=True"):
            vm.memory.map(MAPPED, f)
        region = _map_read_only_host_memory(vm, MAPPED, f)
    assert region.readonly and not region.host_writable
    exit, seen = _peek_poke(cpu, MAPPED, 0x99)
    assert seen == 0x40
    assert isinstance(exit, exits.Mmio) and exit.is_write and exit.address == MAPPED + 8
    below = mmap.mmap(-1, PAGE)
    vm.memory.map(MAPPED - PAGE, below)
    with pytest.raises(pyvt.ArgumentError, match="read-only on the host"):
        vm.memory.write(MAPPED - 4, b"12345678")  # nothing written, not even below's part
    assert below[-4:] == bytes(4)
    assert path.read_bytes()[8:16] == bytes(8)


def test_a_readonly_mapping_turns_guest_writes_into_mmio_exits(vm):
    cpu = _machine(vm)
    mm = mmap.mmap(-1, PAGE)
    _put_u64(mm, 0, 0x2A)
    region = vm.memory.map(MAPPED, mm, readonly=True)
    assert region.readonly and region.host_writable
    exit, seen = _peek_poke(cpu, MAPPED, 0x99)
    assert seen == 0x2A
    assert isinstance(exit, exits.Mmio) and exit.is_write and exit.address == MAPPED + 8
    assert exit.value == 0x99 and _u64(mm, 8) == 0
    vm.memory.write(MAPPED + 8, b"\x01")  # the host still writes it
    assert mm[8] == 1


# -- removing regions -----------------------------------------------------------------


def test_remove_region_then_the_guest_exits_there_and_the_slot_is_reused(vm):
    cpu = _machine(vm)
    mm = mmap.mmap(-1, PAGE)
    first = vm.memory.map(MAPPED, mm)
    added = vm.memory.add_region(OTHER, "64K")
    assert (first.slot, added.slot) == (1, 2)
    vm.memory.remove_region(MAPPED)
    assert [r.gpa for r in vm.memory.regions] == [0, OTHER]
    exit, _ = _peek_poke(cpu, MAPPED, 1)
    assert isinstance(exit, exits.Mmio) and not exit.is_write and exit.address == MAPPED
    assert _exports_released(mm)
    with pytest.raises(pyvt.OutOfRangeError):
        vm.memory.read(MAPPED, 1)
    with pytest.raises(pyvt.ClosedError, match="removed"):
        _ = first.buffer

    again = vm.memory.map(MAPPED, mm)  # the freed slot, and the same object again
    assert again.slot == 1
    cpu.regs.rip = 0x1000  # the read above is retried: now it reaches memory
    _put_u64(mm, 0, 0xA5)
    assert _peek_poke(cpu, MAPPED, 3)[1] == 0xA5

    vm.memory.remove_region(OTHER)  # an add_region region too; its memfd goes
    assert added.memfd == -1
    assert vm.memory.add_region(OTHER, "64K").slot == 2


def _map_read_only_host_memory(vm, gpa, obj):
    """vm.memory.map(gpa, obj, readonly=True) of memory the host cannot
    write; skips where the backend refuses such memory (pyvt.ko pins guest
    pages writable), which map() says in a MemoryConfigError."""
    try:
        return vm.memory.map(gpa, obj, readonly=True)
    except pyvt.MemoryConfigError as e:
        if "read-only on the host" in str(e) and "EFAULT" in str(e):
            pytest.skip(str(e))
        raise


def _vm_with_a_dirty_log(dirty_ring):
    """A VM whose backend keeps a dirty log (a ring if ``dirty_ring``): skips
    where it has none (pyvt.ko: no KVM_MEM_LOG_DIRTY_PAGES, no ring)."""
    try:
        vm = pyvt.Vm("16M", dirty_ring=dirty_ring)
    except pyvt.KvmError as e:
        pytest.skip(f"no dirty ring on this backend: {e}")
    try:
        vm.memory.dirty_pages()
    except pyvt.BackendError as e:
        vm.close()
        pytest.skip(str(e))
    return vm


def test_remove_region_while_the_guest_runs(vm):
    """KVM lets a slot go while a vCPU runs: the guest, looping on the
    mapped memory, sees it vanish and exits there."""
    vm.memory.write(0x1000, pyvt.assemble("""
        .code64
        .globl _start
    _start:
        incq (%rdi)
        jmp _start
    """))
    cpu = vm.vcpu(0, mode="long")
    mm = mmap.mmap(-1, PAGE)
    vm.memory.map(MAPPED, mm)
    cpu.regs.rip, cpu.regs.rdi = 0x1000, MAPPED
    result = []
    runner = threading.Thread(target=lambda: result.append(cpu.run(timeout=60)))
    runner.start()
    try:
        deadline = time.monotonic() + 30
        while _u64(mm, 0) < 3:  # the guest is at work on the host's memory
            assert time.monotonic() < deadline, "the guest never wrote the mapped page"
            time.sleep(0.01)
        vm.memory.remove_region(MAPPED)
    finally:
        runner.join(70)
    exit, = result
    if vm.backend.endswith("pyvt") and isinstance(exit, exits.InternalError):
        pass  # pyvt.ko cannot emulate an ALU instruction on MMIO: it says so
    else:
        assert isinstance(exit, exits.Mmio) and exit.address == MAPPED
    assert _exports_released(mm) and _u64(mm, 0) >= 3


def test_remove_region_refuses_main_ram_and_unknown_addresses(vm):
    with pytest.raises(pyvt.MemoryConfigError, match="main RAM"):
        vm.memory.remove_region(0)
    with pytest.raises(pyvt.ArgumentError, match="no memory region starts at"):
        vm.memory.remove_region(MAPPED)
    vm.memory.map(MAPPED, mmap.mmap(-1, 2 * PAGE))
    with pytest.raises(pyvt.ArgumentError, match="no memory region starts at"):
        vm.memory.remove_region(MAPPED + PAGE)  # inside it, not its start
    assert len(vm.memory.regions) == 2


# -- bad inputs: a clear error and nothing lost ---------------------------------------


@pytest.mark.parametrize("make, kwargs, error, match", [
    (lambda mm: memoryview(mm)[16:16 + PAGE], {}, pyvt.MemoryConfigError, "page boundary"),
    (lambda mm: mmap.mmap(-1, PAGE + 100), {}, pyvt.MemoryConfigError, "whole pages"),
    (lambda mm: mm, {"size": 3 * PAGE}, pyvt.MemoryConfigError, "no 0x3000-byte piece"),
    (lambda mm: mm, {"offset": 100}, pyvt.MemoryConfigError, "offset 0x64"),
    (lambda mm: memoryview(mm)[::2], {}, pyvt.MemoryConfigError, "C-contiguous"),
    (lambda mm: bytes(PAGE), {}, pyvt.MemoryConfigError, "readonly=True|page boundary"),
    (lambda mm: "guest", {}, pyvt.ArgumentTypeError, "cannot map a str"),
    (lambda mm: [0] * PAGE, {}, pyvt.ArgumentTypeError, "cannot map a list"),
    (lambda mm: True, {}, pyvt.ArgumentTypeError, "bool"),
    (lambda mm: 987654, {}, pyvt.ArgumentError, "not an open file"),
])
def test_bad_objects_are_refused(vm, make, kwargs, error, match):
    mm = mmap.mmap(-1, 2 * PAGE)
    with pytest.raises(error, match=match):
        vm.memory.map(MAPPED, make(mm), **kwargs)
    assert len(vm.memory.regions) == 1
    assert _exports_released(mm)  # a refused object is let go


def test_a_read_only_buffer_needs_readonly(vm):
    mm = mmap.mmap(-1, PAGE, access=mmap.ACCESS_READ)
    with pytest.raises(pyvt.MemoryConfigError, match="read-only on the host"):
        vm.memory.map(MAPPED, mm)
    region = _map_read_only_host_memory(vm, MAPPED, mm)
    assert not region.host_writable


def test_a_closed_mmap_is_refused(vm):
    mm = mmap.mmap(-1, PAGE)
    mm.close()
    with pytest.raises(pyvt.ClosedError, match="closed mmap"):
        vm.memory.map(MAPPED, mm)


def test_placement_is_checked(vm):
    mm = mmap.mmap(-1, 2 * PAGE)
    with pytest.raises(pyvt.RegionOverlapError):
        vm.memory.map(0x800000, mm)  # inside the main RAM
    vm.memory.add_region(OTHER, "64K")
    with pytest.raises(pyvt.RegionOverlapError):
        vm.memory.map(OTHER - PAGE, mm)
    with pytest.raises(pyvt.MemoryConfigError, match="page-aligned"):
        vm.memory.map(MAPPED + 8, mm)
    with pytest.raises(pyvt.MemoryConfigError, match="physical address space"):
        vm.memory.map(vm._max_physical_address() - PAGE, mm)
    assert [r.gpa for r in vm.memory.regions] == [0, OTHER]
    assert _exports_released(mm)


def test_mmio_handlers_and_mapped_memory_stay_apart(vm):
    # Vm hands its I/O claims to its memory (GuestMemory._io_claims); done
    # here explicitly so that this test checks GuestMemory's own logic.
    vm.memory._io_claims = vm._claims
    vm.on_mmio(range(MAPPED, MAPPED + PAGE), lambda exit: 0)
    mm = mmap.mmap(-1, 2 * PAGE)
    with pytest.raises(pyvt.RegionOverlapError, match="MMIO .*handler"):
        vm.memory.map(MAPPED, mm)
    with pytest.raises(pyvt.RegionOverlapError, match="MMIO"):
        vm.memory.add_region(MAPPED - PAGE, "8K")
    vm.memory.map(MAPPED, mm, readonly=True)  # reads from memory, writes to the handler
    vm.memory.map(OTHER, mmap.mmap(-1, PAGE))
    with pytest.raises(pyvt.RegionOverlapError, match="guest RAM"):
        vm.on_mmio(range(OTHER, OTHER + 8), lambda exit: 0)


def test_vm_hands_its_mmio_claims_to_its_memory(vm):
    vm.on_mmio(range(MAPPED, MAPPED + PAGE), lambda exit: 0)
    with pytest.raises(pyvt.RegionOverlapError):
        vm.memory.map(MAPPED, mmap.mmap(-1, PAGE))


# -- dirty log, snapshots, clones, close --------------------------------------------------


@pytest.mark.parametrize("ring", [False, True])
def test_the_dirty_log_sees_guest_writes_to_mapped_memory(ring):
    with _vm_with_a_dirty_log(dirty_ring=ring) as vm:
        cpu = _machine(vm)
        vm.memory.map(MAPPED, mmap.mmap(-1, 4 * PAGE))
        vm.memory.dirty_pages()  # tracking starts; what came before is reported
        _peek_poke(cpu, MAPPED + 2 * PAGE, 5)
        found = {d.gpa: list(d) for d in vm.memory.dirty_pages()}
        assert found[MAPPED] == [MAPPED + 2 * PAGE]

        # A removed region's last writes do not show up in the region that
        # reuses its slot.
        _peek_poke(cpu, MAPPED + 3 * PAGE, 6)
        vm.memory.remove_region(MAPPED)
        reuser = vm.memory.map(OTHER, mmap.mmap(-1, 4 * PAGE))
        assert reuser.slot == 1
        _peek_poke(cpu, OTHER + PAGE, 7)
        found = {d.gpa: list(d) for d in vm.memory.dirty_pages()}
        if ring:  # tracked from the start: nothing else was written
            assert found[OTHER] == [OTHER + PAGE]
        else:  # tracking starts now: every page may have been written before
            assert found[OTHER] == [OTHER + page * PAGE for page in range(4)]


def test_snapshots_capture_mapped_memory_and_restore_it_into_the_object(vm):
    cpu = _machine(vm)
    mm = mmap.mmap(-1, 4 * PAGE)
    _put_u64(mm, 0, 0x1234)
    vm.memory.map(MAPPED, mm)
    snap = vm.snapshot()
    assert [image.gpa for image in snap.regions] == [0, MAPPED]
    assert snap.regions[1].read(0, 8) == (0x1234).to_bytes(8, "little")

    _peek_poke(cpu, MAPPED + PAGE, 0x77)  # the guest writes (the dirty log sees it)
    _put_u64(mm, 3 * PAGE, 0x88)  # the host writes the object directly (nobody sees it)
    vm.restore(snap)
    assert bytes(mm) == snap.regions[1].read()
    assert _u64(mm, PAGE + 8) == 0 and _u64(mm, 3 * PAGE) == 0 and _u64(mm, 0) == 0x1234

    # A clone cannot share the host object: it gets an ordinary region
    # with the contents, and its writes stay its own.
    _put_u64(mm, 0, 0x9999)
    with pyvt.Vm.from_snapshot(snap) as clone:
        copy = clone.memory.regions[1]
        assert (copy.gpa, copy.size, copy.source) == (MAPPED, 4 * PAGE, None)
        assert clone.memory.read_int(MAPPED) == 0x1234
        exit, seen = _peek_poke(clone.vcpus[0], MAPPED, 0x31)
        assert isinstance(exit, exits.Hlt) and seen == 0x1234
        assert clone.memory.read_int(MAPPED + 8) == 0x31 and _u64(mm, 8) == 0
    snap.close()


def test_a_snapshot_file_restores_into_mapped_memory(vm, tmp_path):
    """A loaded snapshot has no baseline in this VM: its pages are compared
    and copied into the mapped object."""
    mm = mmap.mmap(-1, 2 * PAGE)
    vm.memory.map(MAPPED, mm)
    _machine(vm)
    mm[PAGE:PAGE + 5] = b"saved"
    vm.snapshot().save(tmp_path / "vm.snap")
    mm[PAGE:PAGE + 5] = b"later"
    mm[0] = 1
    snap = Snapshot.load(tmp_path / "vm.snap")
    try:
        vm.restore(snap)
    finally:
        snap.close()
    assert mm[PAGE:PAGE + 5] == b"saved" and mm[0] == 0


def test_restore_after_remove_region_is_refused(vm):
    mm = mmap.mmap(-1, PAGE)
    vm.memory.map(MAPPED, mm)
    snap = vm.snapshot()
    vm.memory.remove_region(MAPPED)
    with pytest.raises(pyvt.SnapshotError, match="not the snapshot's"):
        vm.restore(snap)
    vm.memory.map(MAPPED, mm)  # the same shape again: restore works
    mm[0] = 9
    vm.restore(snap)
    assert mm[0] == 0


def test_restore_refuses_to_change_read_only_host_memory(vm, tmp_path):
    path = tmp_path / "rom.bin"
    path.write_bytes(b"A" * PAGE)
    with open(path, "rb") as f:
        _map_read_only_host_memory(vm, MAPPED, f)
    _machine(vm)
    snap = vm.snapshot()
    vm.restore(snap)  # nothing differs: nothing to write
    with open(path, "r+b") as f:  # changed outside pyvt
        f.write(b"B")
    with pytest.raises(pyvt.SnapshotError, match="read-only on the host"):
        vm.restore(snap)
    assert path.read_bytes()[:1] == b"B"


def test_close_releases_mapped_objects_but_never_closes_them():
    mm = mmap.mmap(-1, PAGE)
    vm = pyvt.Vm("16M")
    region = vm.memory.map(MAPPED, mm)
    vm.close()
    assert region.mapping is None and region.source is None
    assert not mm.closed and _exports_released(mm)
    mm[0] = 1
    mm.close()
