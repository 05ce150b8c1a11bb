"""Snapshot memory: the restore rule (restore(s) yields exactly s's memory,
whatever happened since) and what a snapshot's memory costs."""

import os
import random

import pytest

import pyvt
from pyvt import exits
from pyvt.snapshot import Snapshot

pytestmark = pytest.mark.requires_kvm

PAGE = 4096
ROM = 0x2000000  # a read-only region above the 16 MiB of RAM

# Writes rbx to [rdi], then stops.
POKE = pyvt.assemble("""
    .code64
    .globl _start
_start:
    mov %rbx, (%rdi)
    hlt
""")


def _machine(memory="16M", rom=True):
    vm = pyvt.Vm(memory)
    if rom:
        vm.memory.add_region(ROM, "1M", readonly=True)
    vm.memory.write(0x1000, POKE)
    vm.vcpu(0, mode="long")
    return vm


def _guest_writes(vm, address, value):
    cpu = vm.vcpus[0]
    cpu.regs.rip, cpu.regs.rdi, cpu.regs.rbx = 0x1000, address, value
    assert isinstance(cpu.run(timeout=10), exits.Hlt)
    assert vm.memory.read_int(address) == value


def _memory(vm):
    return [vm.memory.read(r.gpa, r.size) for r in vm.memory.regions]


def _holds(vm, snap):
    """The VM's memory is byte for byte the snapshot's."""
    assert _memory(vm) == [image.read() for image in snap.regions]


def test_restoring_an_older_snapshot(vm, guest):
    """Snapshot a, the guest writes, snapshot b, the guest writes, restore(a):
    the pages written before b come back too (every snapshot used to reset
    the dirty log, so they kept b-era data)."""
    vm.memory.write(0x1000, POKE)
    vm.vcpu(0, mode="long")
    a = vm.snapshot()
    _guest_writes(vm, 0x200000, 1)
    b = vm.snapshot()
    _guest_writes(vm, 0x300000, 2)
    vm.restore(a)
    assert (vm.memory.read_int(0x200000), vm.memory.read_int(0x300000)) == (0, 0)
    vm.restore(b)
    assert (vm.memory.read_int(0x200000), vm.memory.read_int(0x300000)) == (1, 0)
    vm.restore(a)
    assert (vm.memory.read_int(0x200000), vm.memory.read_int(0x300000)) == (0, 0)
    _holds(vm, a)


def test_host_writes_between_snapshots(vm):
    vm.vcpu(0, mode="long")
    vm.memory.write_int(0x400000, 111)
    c = vm.snapshot()
    vm.memory.write_int(0x400000, 222)
    d = vm.snapshot()
    vm.memory.write_int(0x400000, 333)
    vm.restore(c)
    assert vm.memory.read_int(0x400000) == 111
    vm.restore(d)
    assert vm.memory.read_int(0x400000) == 222


def test_read_only_region_written_by_the_host():
    with _machine() as vm:
        vm.memory.write(ROM, b"ROM-A")
        snap = vm.snapshot()
        vm.memory.write(ROM, b"ROM-B")
        vm.restore(snap)
        assert vm.memory.read(ROM, 5) == b"ROM-A"
        with pyvt.Vm.from_snapshot(snap) as clone:
            clone.memory.write(ROM, b"ROM-C")
            clone.restore(snap)
            assert clone.memory.read(ROM, 5) == b"ROM-A"


def test_restoring_another_vms_snapshot():
    """vm2 took a snapshot of its own (so it tracks its writes) and then
    restores vm1's: all of vm1's memory arrives, none of vm2's stays."""
    with _machine() as vm1, _machine() as vm2:
        vm1.memory.write_int(0x500000, 0xAAAA)
        _guest_writes(vm1, 0x510000, 0xA1)
        s1 = vm1.snapshot()
        vm2.memory.write_int(0x600000, 0xBBBB)
        vm2.snapshot()
        _guest_writes(vm2, 0x610000, 0xB1)
        vm2.restore(s1)
        assert vm2.memory.read_int(0x500000) == 0xAAAA
        assert vm2.memory.read_int(0x510000) == 0xA1
        assert vm2.memory.read_int(0x600000) == vm2.memory.read_int(0x610000) == 0
        _holds(vm2, s1)
        _guest_writes(vm2, 0x500000, 5)  # and again, now on the fast path
        vm2.restore(s1)
        _holds(vm2, s1)


def test_clone_restores_its_parents_snapshots():
    """A clone took a snapshot of its own, wrote, and restores the snapshot
    it was made from, then another snapshot of its parent."""
    with _machine() as vm:
        _guest_writes(vm, 0x200000, 1)
        parent = vm.snapshot()
        _guest_writes(vm, 0x300000, 2)
        later = vm.snapshot()
        with pyvt.Vm.from_snapshot(parent) as clone:
            _guest_writes(clone, 0x200000, 7)
            mine = clone.snapshot()
            _guest_writes(clone, 0x400000, 8)
            clone.memory.write(0x410000, b"host")
            clone.restore(parent)
            _holds(clone, parent)
            clone.restore(later)
            _holds(clone, later)
            clone.restore(mine)
            _holds(clone, mine)
            assert clone.memory.read_int(0x200000) == 7


def test_restore_from_a_loaded_file(tmp_path):
    with _machine() as vm:
        _guest_writes(vm, 0x200000, 1)
        vm.snapshot().save(str(tmp_path / "a.snap"))
        loaded = Snapshot.load(str(tmp_path / "a.snap"))
        _guest_writes(vm, 0x200000, 2)
        vm.snapshot()
        _guest_writes(vm, 0x300000, 3)
        vm.restore(loaded)
        _holds(vm, loaded)
        assert vm.memory.read_int(0x200000) == 1


def test_any_order_of_snapshots_restores_and_clones():
    """A random walk over guest writes, host writes, snapshots, restores of
    any snapshot so far, clones and a second VM: after every restore the
    memory is exactly the snapshot's."""
    rng = random.Random(11)
    pages = [0x100000 + PAGE * rng.randrange(3000) for _ in range(24)]
    rom_pages = [ROM + PAGE * i for i in range(4)]
    with _machine() as vm, _machine() as other:
        snaps = [vm.snapshot()]
        machines = [vm, other]
        for _ in range(160):
            target = rng.choice(machines)
            action = rng.random()
            if action < 0.35:
                _guest_writes(target, rng.choice(pages), rng.randrange(1, 1 << 63))
            elif action < 0.5:
                target.memory.write(rng.choice(pages + rom_pages), os.urandom(rng.randrange(1, 9000)))
            elif action < 0.62:
                snaps.append(target.snapshot())
            elif action < 0.95:
                snap = rng.choice(snaps)
                target.restore(snap)
                _holds(target, snap)
            else:
                clone = pyvt.Vm.from_snapshot(rng.choice(snaps))
                if len(machines) > 3:
                    machines.pop(2).close()
                machines.append(clone)
        for snap in snaps:
            vm.restore(snap)
            _holds(vm, snap)
        for clone in machines[2:]:
            clone.close()


# -- cost ----------------------------------------------------------------------------


def _allocated(fd: int) -> int:
    """Bytes a memfd really holds (its holes cost nothing)."""
    return os.fstat(fd).st_blocks * 512


def test_snapshot_memory_follows_the_pages_in_use(tmp_path):
    """A 1 GiB VM whose guest used a few pages: the snapshot holds those
    pages only (zero pages, touched or not, are holes); restores, clones,
    a clone's snapshot and a saved file never fill the holes in."""
    if pyvt.select_backend() == pyvt.kvm.PYVT_DEVICE:
        pytest.skip("pyvt.ko pins (so allocates) all guest RAM when it maps a slot: no page "
                    "of it is a hole, and 1 GiB does not fit beside the tests in its test VM")
    with pyvt.Vm("1G") as vm:
        vm.memory.write(0x1000, POKE)
        vm.vcpu(0, mode="long")
        vm.memory.write(0x20000000, bytes(PAGE * 16))  # allocated, but zeros
        _guest_writes(vm, 0x30000000, 5)
        snap = vm.snapshot()
        image = snap.regions[0]
        stored = image.data.bit_count()
        assert 1 < stored < 32, stored  # code, mode setup, the guest's page
        assert _allocated(image.memfd) == stored * PAGE
        _guest_writes(vm, 0x30001000, 6)
        vm.restore(snap)
        assert vm.memory.read_int(0x30001000) == 0
        with pyvt.Vm.from_snapshot(snap) as clone:
            # The kernel reads a page in before its private copy is made,
            # so the page the guest writes is allocated (zero) in the image.
            _guest_writes(clone, 0x30002000, 7)
            assert _allocated(image.memfd) <= (stored + 1) * PAGE
            allocated = _allocated(image.memfd)
            of_clone = clone.snapshot()
            assert of_clone.regions[0].data.bit_count() == stored + 1
            assert _allocated(of_clone.regions[0].memfd) == (stored + 1) * PAGE
            clone.restore(snap)
            assert clone.memory.read_int(0x30002000) == 0
            assert clone.memory.read_int(0x30000000) == 5
            of_clone.close()
            assert _allocated(image.memfd) == allocated
        path = tmp_path / "big.snap"
        snap.save(str(path))
        assert path.stat().st_size < (stored + 16) * PAGE
        loaded = Snapshot.load(str(path))
        assert _allocated(loaded.regions[0].memfd) == stored * PAGE
        _guest_writes(vm, 0x30000000, 9)
        vm.restore(loaded)  # no baseline: compares what either side holds
        assert vm.memory.read_int(0x30000000) == 5
        assert _allocated(loaded.regions[0].memfd) == stored * PAGE
