"""The dirty ring (KVM_CAP_DIRTY_LOG_RING) and vm.memory.dirty_pages(), which
answers the same over the ring or the dirty bitmap: real guests write known
pages; snapshots restore exactly on a ring VM; a full ring is emptied on the
way without the caller seeing it; bad sizes and late enabling are refused."""

import threading
from pathlib import Path

import pytest

import pyvt
from pyvt import exits
from pyvt.kvm import PAGE_SIZE

pytestmark = [pytest.mark.requires_kvm, pytest.mark.requires_cap("DIRTY_LOG_RING")]

CODE = 0x1000
TABLE = 0x10000  # the guest reads the addresses to write from here (reads dirty nothing)

WRITER = pyvt.assemble_file(str(Path(__file__).parent / "guests" / "write_table.S"))

# A few dozen pages (ring-0 guest code is emulated on PVM): across 2 MiB
# pages, two writes to one page, writes at a page's last byte.
TARGETS = sorted({0x200000 + n * 0x3000 for n in range(20)}
                 | {0x5FF000 + 0xFF8, 0x600000, 0x7F0000, 0x7F0008, 0xC00000 + 0x123 * 8})
# 1000 pages: far more than a 4 KiB ring holds (256 entries, KVM stops at 192).
MANY = [0x200000 + n * PAGE_SIZE for n in range(1000)]


def _machine(ring, memory="16M", vcpus=1):
    vm = pyvt.Vm(memory, dirty_ring=ring)
    vm.memory.write(CODE, WRITER)
    for index in range(vcpus):
        vm.vcpu(index, mode="long")
    return vm


def _guest_writes(vm, addresses, value, table=TABLE, vcpu=0):
    vm.memory.write(table, b"".join(a.to_bytes(8, "little") for a in addresses) + bytes(8))
    cpu = vm.vcpus[vcpu]
    cpu.regs.rip, cpu.regs.rsi, cpu.regs.rbx = CODE, table, value
    assert isinstance(cpu.run(timeout=30), exits.Hlt)


def _dirty(vm):
    """Every page dirty_pages() reports, as page addresses."""
    return {address for region in vm.memory.dirty_pages() for address in region}


def _pages(addresses):
    return {a & ~(PAGE_SIZE - 1) for a in addresses}


def _holds(vm, snap):
    assert [vm.memory.read(r.gpa, r.size) for r in vm.memory.regions] == \
        [image.read() for image in snap.regions]


@pytest.mark.parametrize("ring", [False, "64K"], ids=["bitmap", "ring"])
def test_dirty_pages_are_exactly_the_pages_the_guest_wrote(ring):
    with _machine(ring) as vm:
        _guest_writes(vm, TARGETS, 1)  # also sets the page tables' accessed/dirty bits
        assert _pages(TARGETS) <= _dirty(vm)
        _guest_writes(vm, TARGETS, 2)
        assert _dirty(vm) == _pages(TARGETS) | {TABLE}  # the table: a host write
        assert _dirty(vm) == set()
        assert vm.memory.read_int(0x7F0008) == 2


def test_a_ring_vm_reports_only_what_was_written_since_its_creation():
    with pyvt.Vm("16M", dirty_ring=True) as vm:
        assert vm.dirty_ring == 64 << 10
        assert _dirty(vm) == set()
        vm.memory.write(0x3000, b"x" * (PAGE_SIZE + 1))
        regions = vm.memory.dirty_pages()
        assert [list(r) for r in regions] == [[0x3000, 0x4000]]
        assert 0x4abc in regions[0] and 0x5000 not in regions[0]
        assert regions[0].runs() == [(0x3000, 2 * PAGE_SIZE)] and len(regions[0]) == 2


@pytest.mark.parametrize("ring", [False, "64K"], ids=["bitmap", "ring"])
def test_host_writes_are_included(ring):
    with _machine(ring) as vm:
        _dirty(vm)
        vm.memory.write(0x400000, b"host")
        vm.memory.write_int(0x401ffc, 0x1122334455667788)  # straddles two pages
        assert _dirty(vm) == {0x400000, 0x401000, 0x402000}
        assert _dirty(vm) == set()


def test_every_vcpus_ring_is_harvested():
    with _machine("16K", vcpus=2) as vm:
        _guest_writes(vm, [0x300000, 0x301000], 5, table=TABLE, vcpu=0)
        _guest_writes(vm, [0x500000], 6, table=TABLE + PAGE_SIZE, vcpu=1)
        _dirty(vm)
        _guest_writes(vm, [0x300000, 0x301000], 7, table=TABLE, vcpu=0)
        _guest_writes(vm, [0x500000], 8, table=TABLE + PAGE_SIZE, vcpu=1)
        assert _dirty(vm) == {0x300000, 0x301000, 0x500000, TABLE, TABLE + PAGE_SIZE}
        assert all(ring.fetch > 0 for ring in vm.fd.dirty_rings())


def test_snapshots_restore_exactly_on_a_ring_vm():
    """Snapshot a, the guest writes, snapshot b, the guest and the host
    write, restore(a), restore(b), restore(a): each time exactly that
    snapshot's memory (KVM refuses KVM_GET_DIRTY_LOG on a ring VM: restore
    takes its pages from the ring)."""
    with _machine("64K") as vm:
        a = vm.snapshot()
        _guest_writes(vm, [0x200000, 0x201000], 1)
        b = vm.snapshot()
        _guest_writes(vm, [0x201000, 0x300000], 2)
        vm.memory.write(0x800000, b"host")
        vm.restore(a)
        _holds(vm, a)
        assert vm.memory.read_int(0x200000) == 0
        vm.restore(b)
        _holds(vm, b)
        assert (vm.memory.read_int(0x201000), vm.memory.read_int(0x300000)) == (1, 0)
        _guest_writes(vm, [0x200000], 3)
        vm.restore(a)
        _holds(vm, a)
        # A restore's copy counts as writing those pages.
        assert {0x200000, 0x201000, 0x300000, 0x800000} <= _dirty(vm)


def test_a_full_ring_is_emptied_without_the_caller_seeing_it():
    """A 4 KiB ring (256 entries) and a guest writing 1000 pages, three
    times: each run() ends at the guest's hlt, the pages all reach
    dirty_pages() (every page of the VM where the backend overran the
    ring: PVM emulates many instructions before it checks the ring), and
    restores stay exact."""
    with _machine("4K") as vm:
        before = vm.snapshot()
        for value in (1, 2, 3):
            _guest_writes(vm, MANY, value)
            assert _pages(MANY) <= _dirty(vm)
            assert vm.memory.read_int(MANY[-1]) == value
        assert vm.vcpus[0].stats["dirty_ring_full_exits"] >= 1
        after = vm.snapshot()
        vm.restore(before)
        _holds(vm, before)
        vm.restore(after)
        _holds(vm, after)


def test_the_thin_layer_ring():
    """VcpuFd.dirty_ring(): the entries KVM wrote (slot, page), flipped to
    RESET by the harvest, freed by reset_dirty_rings()."""
    with _machine("64K") as vm:
        _guest_writes(vm, [0x200000, 0x201000], 1)
        ring = vm.vcpus[0].fd.dirty_ring()
        assert ring is vm.fd.dirty_rings()[0] and ring.entries == 4096
        ring.harvest()
        vm.fd.reset_dirty_rings()
        start = ring.fetch
        _guest_writes(vm, [0x201000, 0x202000], 2)
        assert sorted(ring.harvest()) == [(0, 0x201), (0, 0x202)]
        flags = {ring.gfn(start + i).flags for i in range(2)}
        assert flags == {pyvt.kvm.lib.KVM_DIRTY_GFN_F_RESET}
        assert vm.fd.reset_dirty_rings() == 2
        assert ring.gfn(start).flags == 0 and ring.harvest() == []


def test_enabling_after_a_vcpu_exists_is_refused(kvm):
    with pyvt.Vm("16M") as vm:
        vm.vcpu(0, mode="long")
        with pytest.raises(pyvt.ArgumentError, match="before the VM's first vCPU"):
            vm.fd.enable_dirty_log_ring(1 << 16)
        assert vm.dirty_ring == 0
        vm.memory.write(CODE, WRITER)
        _guest_writes(vm, [0x200000], 4)  # the VM still works, on its bitmap
        assert 0x200000 in _dirty(vm)


@pytest.mark.parametrize("size, error", [
    (1000, pyvt.ArgumentError),  # not a power of two
    (2048, pyvt.ArgumentError),  # below a page
    (1 << 30, pyvt.ArgumentError),  # beyond what KVM allows
    ("64K", pyvt.ArgumentTypeError),
    (True, pyvt.ArgumentTypeError),
])
def test_bad_ring_sizes_are_refused(kvm, size, error):
    vm_fd = kvm.create_vm()
    try:
        with pytest.raises(error, match="dirty ring size"):
            vm_fd.enable_dirty_log_ring(size)
        vm_fd.enable_dirty_log_ring(PAGE_SIZE)  # nothing was lost: a good size works
        with pytest.raises(pyvt.ArgumentError, match="already"):
            vm_fd.enable_dirty_log_ring(PAGE_SIZE)
    finally:
        vm_fd.close()


@pytest.mark.parametrize("spec", [3 * PAGE_SIZE, "3K", "lots", 1.5])
def test_bad_vm_dirty_ring_arguments_are_refused(spec):
    with pytest.raises(pyvt.ArgumentError, match="dirty.ring"):
        pyvt.Vm("16M", dirty_ring=spec)


def test_ring_calls_on_a_vm_without_a_ring_say_so():
    with pyvt.Vm("16M") as vm:
        cpu = vm.vcpu(0)
        with pytest.raises(pyvt.KvmError, match="enable_dirty_log_ring"):
            cpu.fd.dirty_ring()
        with pytest.raises(pyvt.KvmError, match="KVM_CAP_DIRTY_LOG_RING"):
            vm.fd.reset_dirty_rings()
        assert vm.fd.dirty_rings() == []


def test_full_rings_of_vcpus_running_at_once():
    """Two vCPUs in two threads, each writing more pages than its 4 KiB
    ring holds: each run loop empties its own full ring (one harvest at a
    time, while the other vCPU runs) and no page is lost."""
    with _machine("4K", memory="32M", vcpus=2) as vm:
        halves = [MANY, [a + 0x1000000 for a in MANY]]
        for index, addresses in enumerate(halves):
            table = TABLE + index * 0x4000
            vm.memory.write(table, b"".join(a.to_bytes(8, "little") for a in addresses)
                            + bytes(8))
            cpu = vm.vcpus[index]
            cpu.regs.rip, cpu.regs.rsi, cpu.regs.rbx = CODE, table, 9
        _dirty(vm)
        results = {}

        def run(index):
            try:
                results[index] = vm.vcpus[index].run(timeout=30)
            except BaseException as e:  # reported by the assert below
                results[index] = e

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert all(isinstance(results[i], exits.Hlt) for i in range(2)), results
        assert _pages(MANY) | _pages(halves[1]) <= _dirty(vm)
        assert sum(vm.vcpus[i].stats["dirty_ring_full_exits"] for i in range(2)) >= 1
