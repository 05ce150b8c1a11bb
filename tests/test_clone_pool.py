"""Snapshot.prepare_clones (pyvt/clone_pool.py): clones made ahead of time,
handed out by Vm.from_snapshot in the snapshot's state."""

from __future__ import annotations

import time

import pytest

import pyvt
from pyvt import clone_pool, exits

pytestmark = pytest.mark.requires_kvm

COUNTER = 0x5000
#: inc qword [COUNTER]; hlt
BUMP = bytes.fromhex("48ff042500500000") + b"\xf4"


@pytest.fixture
def snap():
    with pyvt.Vm("4M") as vm:
        vm.memory.write(0x1000, BUMP)
        vm.memory.write(COUNTER, (41).to_bytes(8, "little"))
        cpu = vm.vcpu(0, mode="long")
        cpu.regs.rip = 0x1000
        cpu.regs.rbx = 0xB0B
        taken = vm.snapshot()
    yield taken
    taken.close()


def test_a_prepared_clone_is_handed_out_in_the_snapshots_state(snap):
    snap.prepare_clones(2)
    assert snap.prepared_clones == 2
    time.sleep(0.05)  # the clones wait (their TSCs run on), as they would in use
    with pyvt.Vm.from_snapshot(snap) as clone:
        assert snap.prepared_clones == 1
        state = clone.vcpus[0].save_state()
        assert (state.regs, state.sregs2 or state.sregs) == \
            (snap.vcpus[0].regs, snap.vcpus[0].sregs2 or snap.vcpus[0].sregs)
        assert isinstance(clone.vcpus[0].run(timeout=10), exits.Hlt)
        assert clone.memory.read_int(COUNTER) == 42
        assert clone.vcpus[0].regs.rbx == 0xB0B


def test_prepared_clones_share_nothing_they_write(snap):
    snap.prepare_clones(2)
    first, second = pyvt.Vm.from_snapshot(snap), pyvt.Vm.from_snapshot(snap)
    try:
        assert snap.prepared_clones == 0
        for _ in range(3):
            first.vcpus[0].regs.rip = 0x1000
            first.vcpus[0].run(timeout=10)
        assert first.memory.read_int(COUNTER) == 44
        assert second.memory.read_int(COUNTER) == 41
        second.vcpus[0].run(timeout=10)
        assert second.memory.read_int(COUNTER) == 42
    finally:
        first.close()
        second.close()
    with pyvt.Vm.from_snapshot(snap) as third:  # the pool is empty: a new clone
        assert third.memory.read_int(COUNTER) == 41


def test_closing_the_snapshot_closes_the_clones_nobody_took(snap):
    snap.prepare_clones(3)
    waiting = [vm for _, _, vm in clone_pool.prepared(snap)]
    taken = pyvt.Vm.from_snapshot(snap)
    snap.close()
    assert snap.prepared_clones == 0
    assert sum(vm.closed for vm in waiting) == 2
    assert not taken.closed  # a clone handed out is its owner's
    taken.vcpus[0].run(timeout=10)
    assert taken.memory.read_int(COUNTER) == 42
    taken.close()


def test_a_subclass_makes_its_own_clone(snap):
    class MyVm(pyvt.Vm):
        pass

    snap.prepare_clones(1)
    with MyVm.from_snapshot(snap) as clone:
        assert type(clone) is MyVm
        assert snap.prepared_clones == 1


@pytest.mark.parametrize("count", [-1, 1.5, True, "2"])
def test_bad_counts_are_refused(snap, count):
    with pytest.raises(pyvt.ArgumentError, match="number of clones"):
        snap.prepare_clones(count)
    assert snap.prepared_clones == 0
    snap.prepare_clones(0)
    assert snap.prepared_clones == 0


def test_a_closed_snapshot_prepares_nothing(snap):
    snap.close()
    with pytest.raises(pyvt.SnapshotError):
        snap.prepare_clones(1)
