"""pyvt.virtio's split virtqueue helpers on a VM's memory, no guest running:
the test plays the driver, writing descriptors and rings as Linux would."""

import struct

import pytest

import pyvt
from pyvt.virtio import Virtqueue, VirtqueueError
from pyvt.virtio.constants import (
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
)

DESC, AVAIL, USED = 0x10000, 0x11000, 0x12000
SIZE = 8


class Driver:
    """The driver's half of a split queue in guest memory."""

    def __init__(self, memory, size=SIZE):
        self.memory, self.size = memory, size
        self.avail_idx = 0

    def desc(self, index, addr, length, flags=0, next_index=0, table=DESC):
        self.memory.write(table + 16 * index, struct.pack("<QIHH", addr, length, flags, next_index))

    def offer(self, head):
        self.memory.write_int(AVAIL + 4 + 2 * (self.avail_idx % self.size), head, 2)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.memory.write_int(AVAIL + 2, self.avail_idx, 2)

    def used(self, slot):
        return struct.unpack("<II", self.memory.read(USED + 4 + 8 * (slot % self.size), 8))

    @property
    def used_idx(self):
        return self.memory.read_int(USED + 2, 2)


@pytest.fixture
def vm():
    with pyvt.Vm("1M") as vm:
        yield vm


def queue(vm, **kw):
    return Virtqueue(vm.memory, SIZE, DESC, AVAIL, USED, **kw)


def test_chain_readable_then_writable_as_memoryviews(vm):
    d = Driver(vm.memory)
    vm.memory.write(0x20000, b"hello ")
    vm.memory.write(0x20100, b"world")
    d.desc(0, 0x20000, 6, VIRTQ_DESC_F_NEXT, 3)
    d.desc(3, 0x20100, 5, VIRTQ_DESC_F_NEXT, 5)
    d.desc(5, 0x30000, 16, VIRTQ_DESC_F_WRITE)
    d.offer(0)
    q = queue(vm)
    assert q.pending == 1
    chain = q.pop()
    assert chain.head == 0
    assert chain.read() == b"hello world" and chain.readable_size == 11
    assert chain.writable_size == 16
    assert all(isinstance(v, memoryview) for v in chain.readable + chain.writable)
    chain.write(b"HELLO")
    chain.write(b"!")
    assert vm.memory.read(0x30000, 6) == b"HELLO!"
    with pytest.raises(pyvt.ArgumentError):
        chain.write(b"x" * 11)
    assert q.pop() is None
    q.push(chain)
    assert d.used_idx == 1 and d.used(0) == (0, 6)
    assert q.notify() is True  # no EVENT_IDX, no NO_INTERRUPT: interrupt
    assert q.notify() is False  # nothing new since


def test_indirect_table(vm):
    d = Driver(vm.memory)
    table = 0x21000
    vm.memory.write(0x20000, b"abc")
    d.desc(0, 0x20000, 3, VIRTQ_DESC_F_NEXT, 1, table=table)
    d.desc(1, 0x30000, 4, VIRTQ_DESC_F_WRITE, table=table)
    d.desc(2, table, 32, VIRTQ_DESC_F_INDIRECT)
    d.offer(2)
    chain = queue(vm, indirect=True).pop()
    assert chain.head == 2 and chain.read() == b"abc" and chain.writable_size == 4

    d.offer(2)
    with pytest.raises(VirtqueueError, match="INDIRECT_DESC was not negotiated"):
        queue(vm, last_avail=1).pop()


def test_wraparound_of_the_free_running_indexes(vm):
    d = Driver(vm.memory)
    d.avail_idx = 0xFFFE
    vm.memory.write_int(AVAIL + 2, d.avail_idx, 2)
    vm.memory.write_int(USED + 2, 0xFFFE, 2)
    q = queue(vm, last_avail=0xFFFE, used_idx=0xFFFE)
    for head in range(4):
        d.desc(head, 0x30000 + 0x100 * head, 8, VIRTQ_DESC_F_WRITE)
        d.offer(head)
    assert d.avail_idx == 2 and q.pending == 4
    heads = []
    for chain in q:
        chain.write(bytes([chain.head]) * 8)
        q.push(chain)
        heads.append(chain.head)
    assert heads == [0, 1, 2, 3]
    assert q.last_avail == 2 and d.used_idx == 2
    assert [d.used(slot)[0] for slot in (0xFFFE, 0xFFFF, 0, 1)] == [0, 1, 2, 3]


def test_event_idx_suppresses_interrupts_until_used_event(vm):
    d = Driver(vm.memory)
    q = queue(vm, event_idx=True, interrupt=lambda: fired.append(1))
    fired = []
    vm.memory.write_int(AVAIL + 4 + 2 * SIZE, 2, 2)  # used_event: interrupt when idx passes 2
    for head in range(3):
        d.desc(head, 0x30000, 1, VIRTQ_DESC_F_WRITE)
        d.offer(head)
    for n, chain in enumerate(q, 1):
        q.push(chain, 0)
        q.notify()
        assert len(fired) == (1 if n == 3 else 0)
    # avail_event tells the driver where the device is
    assert vm.memory.read_int(USED + 4 + 8 * SIZE, 2) == 3


def test_no_interrupt_flag_without_event_idx(vm):
    d = Driver(vm.memory)
    vm.memory.write_int(AVAIL, VIRTQ_AVAIL_F_NO_INTERRUPT, 2)
    d.desc(0, 0x30000, 1, VIRTQ_DESC_F_WRITE)
    d.offer(0)
    q = queue(vm)
    q.push(q.pop(), 1)
    assert q.notify() is False


@pytest.mark.parametrize("setup, message", [
    (lambda d: d.desc(0, 0xF0000000, 16), "not all guest RAM"),
    (lambda d: d.desc(0, 0xFFF00, 0x1000), "not all guest RAM"),
    (lambda d: d.desc(0, 0x20000, 16, VIRTQ_DESC_F_NEXT, 99), "past the 8 descriptors"),
    (lambda d: (d.desc(0, 0x20000, 1, VIRTQ_DESC_F_NEXT, 1),
                d.desc(1, 0x20000, 1, VIRTQ_DESC_F_NEXT, 0)), "loops"),
    (lambda d: (d.desc(0, 0x20000, 1, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 1),
                d.desc(1, 0x20000, 1)), "readable buffer after a device-writable"),
    (lambda d: d.desc(0, 0x21000, 24, VIRTQ_DESC_F_INDIRECT), "multiple of 16"),
    (lambda d: d.desc(0, 0xFFFFFFFFFFFFFF00, 0x200), "not a guest address range"),
])
def test_bad_chains_are_errors_and_break_the_queue(vm, setup, message):
    d = Driver(vm.memory)
    setup(d)
    d.offer(0)
    q = queue(vm, indirect=True)
    with pytest.raises(VirtqueueError, match=message):
        q.pop()
    assert q.broken
    with pytest.raises(VirtqueueError, match="must reset"):
        q.pop()


def test_bad_head_and_runaway_avail_index(vm):
    d = Driver(vm.memory)
    d.offer(SIZE)  # head past the table
    with pytest.raises(VirtqueueError, match="chain head 8"):
        queue(vm).pop()
    vm.memory.write_int(AVAIL + 2, SIZE + 1, 2)
    with pytest.raises(VirtqueueError, match="more than the queue's 8"):
        queue(vm).pop()


def test_rings_outside_ram_or_misaligned(vm):
    with pytest.raises(VirtqueueError, match="descriptor table"):
        Virtqueue(vm.memory, SIZE, 0xFFFF0, AVAIL, USED)
    with pytest.raises(VirtqueueError, match="aligned"):
        Virtqueue(vm.memory, SIZE, DESC + 8, AVAIL, USED)
    with pytest.raises(VirtqueueError, match="device area"):
        Virtqueue(vm.memory, SIZE, DESC, AVAIL, 1 << 40)
    with pytest.raises(pyvt.ArgumentError, match="power of 2"):
        Virtqueue(vm.memory, 6, DESC, AVAIL, USED)


def test_device_writes_reach_snapshots(vm):
    """A write through a chain's memoryview is seen by a snapshot restore."""
    d = Driver(vm.memory)
    vm.vcpu(0)
    snap = vm.snapshot()
    d.desc(0, 0x30000, 4, VIRTQ_DESC_F_WRITE)
    d.offer(0)
    q = queue(vm)
    chain = q.pop()
    chain.write(b"DATA")
    q.push(chain)
    vm.restore(snap)
    assert vm.memory.read(0x30000, 4) == b"\0\0\0\0"
    assert vm.memory.read_int(USED + 2, 2) == 0
