"""The native virtio workers (pyvt._virtio) driven from Python: queues laid
out in a Vm's RAM, kicks written to the kick eventfd, interrupts awaited on
the call eventfd.  No guest code runs; the data the worker moved and its
used-ring entries are checked."""

from __future__ import annotations

import os

import pytest

import pyvt
from pyvt import _virtio
from pyvt._virtio import RngWorker

from virtio_native_driver import (
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_USED_F_NO_NOTIFY,
    Queue,
)

pytestmark = pytest.mark.requires_kvm

RING = 0x10000      # where the queues go
DATA = 0x100000     # where the buffers go
V1 = 1 << VIRTIO_F_VERSION_1


@pytest.fixture
def queues(vm):
    made = []

    def make(index=0, size=16):
        q = Queue(vm.memory, RING + index * 0x8000, size)
        made.append(q)
        return q

    yield make
    for q in made:
        q.close()


@pytest.fixture
def workers():
    made = []

    def keep(worker):
        made.append(worker)
        return worker

    yield keep
    for w in made:
        w.stop()


@pytest.fixture
def serving(vm, queues, workers):
    """``serving(features)`` -> (a running RngWorker, its queue 0)."""

    def make(features=V1):
        rng = workers(RngWorker(vm.memory))
        q = queues()
        q.attach(rng, 0)
        rng.set_features(features)
        rng.start()
        return rng, q

    return make


def test_host_regions_lists_the_ram_a_device_may_touch(vm):
    vm.memory.add_region(0x4000000, "1M")
    vm.memory.add_region(0x5000000, "1M", readonly=True)
    regions = vm.memory.host_regions()
    assert [(gpa, size) for gpa, size, _ in regions] == [(0, 16 << 20), (0x4000000, 1 << 20)]
    vm.memory.write(0x4000010, b"seen")
    import ctypes
    assert ctypes.string_at(regions[1][2] + 0x10, 4) == b"seen"


def test_rng_fills_writable_buffers(vm, queues, workers):
    rng = workers(RngWorker(vm.memory))
    assert rng.supported_features & V1
    q = queues()
    q.attach(rng, 0)
    rng.set_features(V1)
    rng.start()
    vm.memory.write(DATA, bytes(4096))
    head = q.add([(DATA, 64, True), (DATA + 1000, 100, True)])
    assert q.wait_used() == [(head, 164)]
    first = vm.memory.read(DATA, 64) + vm.memory.read(DATA + 1000, 100)
    assert first != bytes(164) and vm.memory.read(DATA + 64, 936) == bytes(936)
    q.add([(DATA, 64, True)])
    q.wait_used()
    assert vm.memory.read(DATA, 64) != first[:64]
    assert rng.take_isr() == _virtio.ISR_QUEUE and rng.take_isr() == 0
    assert rng.stats[0]["requests"] == 2 and rng.stats[0]["bytes"] == 228
    assert rng.queue_state(0) == (2, 2)


def test_rng_indirect_chain(vm, serving):
    rng, q = serving(V1 | 1 << VIRTIO_RING_F_INDIRECT_DESC)
    vm.memory.write(DATA, bytes(64))
    head = q.add_indirect([(DATA, 16, True), (DATA + 32, 16, True)], table=DATA + 0x1000)
    assert q.wait_used() == [(head, 32)]
    assert vm.memory.read(DATA, 16) != bytes(16) and vm.memory.read(DATA + 16, 16) == bytes(16)


def test_indirect_refused_unless_negotiated(vm, serving):
    rng, q = serving()
    vm.memory.write(DATA, bytes(16))
    head = q.add_indirect([(DATA, 16, True)], table=DATA + 0x1000)
    assert q.wait_used() == [(head, 0)]
    assert vm.memory.read(DATA, 16) == bytes(16)
    assert rng.stats[0]["errors"] == 1


def test_requests_made_while_stopped_are_served_at_start(vm, queues, workers):
    rng = workers(RngWorker(vm.memory))
    q = queues()
    q.attach(rng, 0)
    q.add([(DATA, 8, True)], kick=False)
    q.add([(DATA + 8, 8, True)], kick=False)
    rng.start()
    assert [n for _, n in q.wait_used(2)] == [8, 8]


def test_stop_start_keeps_positions_and_reset_forgets(vm, serving):
    rng, q = serving()
    for _ in range(3):
        q.add([(DATA, 8, True)])
        q.wait_used()
    rng.stop()
    assert not rng.running and rng.queue_state(0) == (3, 3)
    q.add([(DATA, 8, True)])     # kicked while stopped
    rng.start()
    q.wait_used()
    assert rng.queue_state(0) == (4, 4)
    rng.stop()
    rng.start()
    with pytest.raises(pyvt.DeviceError, match="stop"):
        rng.reset()
    rng.stop()
    rng.reset()
    assert rng.features == 0
    with pytest.raises(pyvt.ArgumentError, match="not set up"):
        rng.set_queue_state(0, 0)


def test_set_queue_state_restores_a_position(vm, queues, workers):
    rng = workers(RngWorker(vm.memory))
    q = queues()
    q.attach(rng, 0)
    for _ in range(2):
        q.add([(DATA, 8, True)], kick=False)
    # As after a restore: the first chain was served before the snapshot.
    vm.memory.write_int(q.used + 2, 1, 2)
    q.used_seen = 1
    rng.set_queue_state(0, 1)
    assert rng.queue_state(0) == (1, 1)
    rng.start()
    assert q.wait_used() == [(1, 8)]
    assert rng.queue_state(0) == (2, 2)


def test_no_interrupt_flag_suppresses_the_call(vm, queues, workers):
    rng = workers(RngWorker(vm.memory))
    q = queues()
    q.attach(rng, 0)
    rng.set_features(V1)
    q.set_avail_flags(VRING_AVAIL_F_NO_INTERRUPT)
    rng.start()
    q.add([(DATA, 8, True)])
    q.wait_used(interrupts=False)
    rng.stop()          # joined: the worker decided
    assert q.interrupts() == 0 and rng.stats[0]["notifies"] == 0
    q.set_avail_flags(0)
    rng.start()
    q.add([(DATA, 8, True)])
    q.wait_used()


def test_event_idx_honours_used_event_and_sets_avail_event(vm, queues, workers):
    rng = workers(RngWorker(vm.memory))
    q = queues()
    q.attach(rng, 0)
    rng.set_features(V1 | 1 << VIRTIO_RING_F_EVENT_IDX)
    q.set_used_event(2)  # interrupt when the used index passes 2 (3 chains)
    rng.start()
    q.add([(DATA, 8, True)])
    q.wait_used(interrupts=False)
    q.add([(DATA, 8, True)])
    q.wait_used(interrupts=False)
    rng.stop()
    assert q.interrupts() == 0
    # The device asks for a kick at the next chain.
    assert q.avail_event == 2
    rng.start()
    q.add([(DATA, 8, True)])
    q.wait_used()       # the third chain crosses used_event: interrupted
    assert rng.stats[0]["notifies"] == 1


def test_used_flags_ask_for_kicks_without_event_idx(vm, serving):
    rng, q = serving()
    q.add([(DATA, 8, True)])
    q.wait_used()
    rng.stop()
    assert not q.used_flags & VRING_USED_F_NO_NOTIFY


def test_queue_errors(vm, workers):
    rng = workers(RngWorker(vm.memory))
    with pytest.raises(pyvt.VirtqueueError, match="power of two"):
        rng.set_queue(0, 12, RING, RING + 0x1000, RING + 0x2000, None, None)
    with pytest.raises(pyvt.VirtqueueError, match="aligned"):
        rng.set_queue(0, 16, RING + 8, RING + 0x1000, RING + 0x2000, None, None)
    with pytest.raises(pyvt.VirtqueueError, match="outside guest RAM"):
        rng.set_queue(0, 16, RING, RING + 0x1000, (16 << 20) - 8, None, None)
    with pytest.raises(pyvt.ArgumentError, match="no queue 1"):
        rng.set_queue(1, 16, RING, RING + 0x1000, RING + 0x2000, None, None)
    with pytest.raises(pyvt.ArgumentError, match="not an open file descriptor"):
        rng.set_queue(0, 16, RING, RING + 0x1000, RING + 0x2000, 9999, None)
    with pytest.raises(pyvt.ArgumentError, match="no RAM"):
        RngWorker([])
    with pytest.raises(pyvt.ArgumentTypeError):
        RngWorker(42)
    rng.set_queue(0, 16, RING, RING + 0x1000, RING + 0x2000, None, None)
    rng.start()
    with pytest.raises(pyvt.DeviceError, match="running"):
        rng.set_queue(0, 16, RING, RING + 0x1000, RING + 0x2000, None, None)
    with pytest.raises(pyvt.DeviceError, match="running"):
        rng.start()


# -- a guest that breaks the rules: the request fails, nothing crashes ----------


def test_buffer_outside_ram_fails_the_request(vm, serving):
    rng, q = serving()
    head = q.add([(DATA, 8, True), ((16 << 20) - 4, 8, True)])  # runs off the end of RAM
    assert q.wait_used() == [(head, 0)]
    head = q.add([(1 << 40, 8, True)])
    assert q.wait_used() == [(head, 0)]
    assert rng.stats[0]["errors"] == 2
    q.add([(DATA, 8, True)])
    assert [n for _, n in q.wait_used()] == [8]  # the queue still works


def test_descriptor_loop_is_handed_back(vm, serving):
    rng, q = serving()
    q.write_desc(0, DATA, 8, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 1)
    q.write_desc(1, DATA, 8, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 0)
    q.free.remove(0)
    q.free.remove(1)
    q.publish(0)
    assert q.wait_used() == [(0, 0)]
    assert rng.stats[0]["errors"] == 1 and not rng.stats[0]["broken"]


def test_next_past_the_table_and_readable_after_writable(vm, serving):
    rng, q = serving()
    q.write_desc(0, DATA, 8, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 999)
    q.write_desc(1, DATA, 8, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 2)
    q.write_desc(2, DATA, 8, 0)
    for i in (0, 1, 2):
        q.free.remove(i)
    q.publish(0)
    q.publish(1)
    assert q.wait_used(2) == [(0, 0), (1, 0)]
    assert rng.stats[0]["errors"] == 2


def test_head_past_the_table_breaks_the_queue(vm, serving):
    rng, q = serving()
    q.publish(500)
    q.add([(DATA, 8, True)])
    rng.stop()
    assert rng.stats[0]["broken"] and q.used_idx == 0
    q.attach(rng, 0)  # the driver sets the queue up again
    assert not rng.stats[0]["broken"]


def test_stress_nothing_lost(vm, queues, workers):
    rng = workers(RngWorker(vm.memory))
    q = queues(size=256)
    q.attach(rng, 0)
    rng.set_features(V1 | 1 << VIRTIO_RING_F_EVENT_IDX)
    rng.start()
    total = 0
    for _ in range(40):
        heads = [q.add([(DATA + 64 * i, 32, True)], kick=(i % 7 == 0)) for i in range(200)]
        q.kick()
        q.set_used_event((q.avail_idx - 1) & 0xFFFF)
        done = q.wait_used(200, interrupts=False)
        assert sorted(h for h, _ in done) == sorted(heads)
        assert all(n == 32 for _, n in done)
        total += 200
    assert rng.stats[0]["requests"] == total and rng.stats[0]["errors"] == 0


def test_guest_kick_through_an_ioeventfd(vm, queues, workers):
    """The whole path with a guest: its port write signals the kick eventfd
    inside KVM (no exit to Python), the worker serves, the guest sees its
    used ring move."""
    rng = workers(RngWorker(vm.memory))
    q = queues()
    q.attach(rng, 0)
    rng.set_features(V1)
    vm.fd.register_ioeventfd(q.kick_fd, 0xC000, 2, pio=True)
    rng.start()
    # The chain is ready; the guest makes it available, then kicks.
    q.write_desc(0, DATA, 32, VRING_DESC_F_WRITE)
    vm.memory.write_int(q.avail + 4, 0, 2)
    vm.memory.write(0x1000, pyvt.assemble(f"""
.code64
.globl _start
_start:
    movw $1, {q.avail + 2}
    mov $0xc000, %dx
    xor %eax, %eax
    out %ax, (%dx)
1:  cmpw $1, {q.used + 2}
    jne 1b
    hlt
""", at=0x1000))
    cpu = vm.vcpu(0, mode="long")
    cpu.regs.rip = 0x1000
    exit = cpu.run(timeout=60)
    assert isinstance(exit, pyvt.exits.Hlt), exit
    assert q.wait_used() == [(0, 32)]
    assert vm.memory.read(DATA, 32) != bytes(32)
    rng.stop()
    # One kick, through KVM: the worker took it, or it is still pending.
    try:
        left = os.eventfd_read(q.kick_fd)
    except BlockingIOError:
        left = 0
    assert rng.stats[0]["kicks"] + left == 1


# -- pages the device writes: KVM's dirty log does not see them ---------------


def test_take_written_reports_the_device_writes(vm, serving):
    rng, q = serving()
    q.add([(DATA + 0x1ff8, 16, True)])      # straddles two pages
    q.wait_used()
    rng.stop()
    written = dict(rng.take_written())
    ring_page, data_page = q.used // 4096, DATA // 4096
    assert written == {0: 1 << ring_page | 1 << (data_page + 1) | 1 << (data_page + 2)}
    assert rng.take_written() == []


def test_report_written_reaches_dirty_pages_and_restore(vm, queues, workers):
    rng = workers(RngWorker(vm.memory))
    q = queues()
    q.attach(rng, 0)
    vm.memory.write(DATA, b"before" + bytes(26))
    snap = vm.snapshot()
    vm.memory.dirty_pages()                  # tracking from here
    rng.start()
    q.add([(DATA, 32, True)])
    q.wait_used()
    rng.stop()
    assert DATA not in list(vm.memory.dirty_pages()[0])   # unseen by KVM
    rng.report_written(vm.memory)
    assert DATA in list(vm.memory.dirty_pages()[0])
    assert vm.memory.read(DATA, 6) != b"before"
    vm.restore(snap)
    assert vm.memory.read(DATA, 6) == b"before"


def test_set_memory_moves_queues_or_breaks_them(vm, queues, workers):
    vm.memory.add_region(0x4000000, "1M")
    rng = workers(RngWorker(vm.memory))
    high = Queue(vm.memory, 0x4000000, 16)
    try:
        high.attach(rng, 0)
        rng.set_memory(vm.memory)          # the same RAM: the queue stays
        rng.start()
        high.add([(DATA, 8, True)])
        high.wait_used()
        rng.stop()
        vm.memory.remove_region(0x4000000)
        rng.set_memory(vm.memory)          # its rings are gone: broken, never touched
        assert rng.stats[0]["broken"]
        rng.start()
        rng.stop()
    finally:
        high.close()


def test_worker_keeps_the_ram_it_uses_mapped(kvm, tmp_path):
    """A VM closed under a running worker: its RAM stays mapped until the
    worker goes (else the worker's next access would fault)."""
    import ctypes

    vm = pyvt.Vm("16M", backend=kvm.path)
    host = vm.memory.host_regions()[0][2]
    q = Queue(vm.memory, RING, 16)
    rng = RngWorker(vm.memory)
    q.attach(rng, 0)
    rng.start()
    vm.close()
    q.kick()                           # no chain: the worker reads the ring
    ctypes.memset(host + DATA, 0, 8)   # still mapped
    rng.stop()
    q.close()
    assert ctypes.string_at(host + DATA, 8) == bytes(8)
    del rng


def test_rng_refuses_a_device_readable_buffer(vm, serving):
    rng, q = serving()
    vm.memory.write(DATA, b"\x55" * 16)
    head = q.add([(DATA, 16, False)])
    assert q.wait_used() == [(head, 0)]
    assert vm.memory.read(DATA, 16) == b"\x55" * 16
    assert rng.stats[0]["errors"] == 1


def test_the_worker_never_needs_the_gil(vm, serving):
    """This thread holds the GIL (a ctypes.PyDLL call keeps it) while it
    waits in poll() for the worker's interrupt: a worker that took the GIL
    anywhere on its path would never signal."""
    import ctypes
    import select as select_module

    rng, q = serving()
    libc = ctypes.PyDLL(None)   # PyDLL: the GIL stays held during calls
    libc.poll.argtypes = [ctypes.c_void_p, ctypes.c_ulong, ctypes.c_int]

    class PollFd(ctypes.Structure):
        _fields_ = [("fd", ctypes.c_int), ("events", ctypes.c_short), ("revents", ctypes.c_short)]

    wait = PollFd(q.call_fd, select_module.POLLIN, 0)
    q.add([(DATA, 64, True)])
    ready = libc.poll(ctypes.byref(wait), 1, 20000)
    assert ready == 1 and wait.revents & select_module.POLLIN
    assert q.wait_used() == [(0, 64)]
