"""The native virtio-blk worker against a temporary raw image: reads,
writes, flush, GET_ID, read-only refusal, and requests that break the rules
(outside RAM, past the disk, a descriptor loop)."""

from __future__ import annotations

import os
import struct
import time

import pytest

import pyvt
from pyvt._virtio import BlkWorker

from virtio_native_driver import (
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    Queue,
)

pytestmark = pytest.mark.requires_kvm

T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD = 0, 1, 4, 8, 11
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2
RING = 0x10000
HDR = 0x200000      # request headers, 16 bytes apart
STATUS = 0x210000   # status bytes
DATA = 0x300000
SECTORS = 64


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(range(256)) * (SECTORS * 2))
    return path


def open_disk(vm, image, readonly=False, size=256,
              features=BlkWorker.supported_features & ~(1 << VIRTIO_RING_F_EVENT_IDX)):
    """(worker, queue): a running BlkWorker over the image.  Not EVENT_IDX
    by default: this driver does not move used_event (test_virtio_native.py
    tests it)."""
    fd = os.open(image, os.O_RDONLY if readonly else os.O_RDWR)
    blk = BlkWorker(vm.memory, fd, readonly=readonly, serial="pyvt-disk-0")
    os.close(fd)  # the worker holds its own
    q = Queue(vm.memory, RING, size)
    q.attach(blk, 0)
    blk.set_features(features)
    blk.start()
    return blk, q


@pytest.fixture
def disk(vm, image):
    """(worker, queue): a running BlkWorker over the image, read-write."""
    blk, q = open_disk(vm, image)
    yield blk, q
    blk.stop()
    q.close()


def request(vm, q, slot, type_, sector, data_len=0, write_data=None, data_gpa=DATA, kick=True):
    """Queues header, data (device-writable unless writing), status."""
    hdr = HDR + 16 * slot
    vm.memory.write(hdr, struct.pack("<IIQ", type_, 0, sector))
    vm.memory.write(STATUS + slot, b"\xee")
    chain = [(hdr, 16, False)]
    if write_data is not None:
        vm.memory.write(data_gpa, write_data)
        chain.append((data_gpa, len(write_data), False))
    elif data_len:
        chain.append((data_gpa, data_len, True))
    chain.append((STATUS + slot, 1, True))
    return q.add(chain, kick=kick)


def status(vm, slot):
    return vm.memory.read(STATUS + slot, 1)[0]


def test_read_write_flush(vm, disk, image):
    blk, q = disk
    assert blk.sector_count == SECTORS and not blk.readonly
    head = request(vm, q, 0, T_IN, 2, 1024)
    assert q.wait_used() == [(head, 1025)]
    assert status(vm, 0) == S_OK
    assert vm.memory.read(DATA, 1024) == (bytes(range(256)) * 4)
    pattern = b"pyvt" * 256
    head = request(vm, q, 1, T_OUT, 5, write_data=pattern)
    assert q.wait_used() == [(head, 1)] and status(vm, 1) == S_OK
    head = request(vm, q, 2, T_FLUSH, 0)
    assert q.wait_used() == [(head, 1)] and status(vm, 2) == S_OK
    assert image.read_bytes()[5 * 512:7 * 512] == pattern
    assert blk.stats[0]["bytes"] == 2048 and blk.stats[0]["errors"] == 0


def test_scattered_read_through_an_indirect_table(vm, image):
    blk, q = open_disk(vm, image, readonly=True, size=16,
                       features=1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_RING_F_INDIRECT_DESC)
    try:
        vm.memory.write(HDR, struct.pack("<IIQ", T_IN, 0, 1))
        # 512 bytes split 100 + 412, the status sharing the last buffer.
        head = q.add_indirect([(HDR, 16, False), (DATA, 100, True), (DATA + 0x1000, 413, True)],
                              table=0x400000)
        assert q.wait_used() == [(head, 513)]
        data = vm.memory.read(DATA, 100) + vm.memory.read(DATA + 0x1000, 412)
        assert data == bytes(range(256)) * 2
        assert vm.memory.read(DATA + 0x1000 + 412, 1) == bytes([S_OK])
    finally:
        blk.stop()
        q.close()


def test_get_id_and_unsupported(vm, disk):
    blk, q = disk
    request(vm, q, 0, T_GET_ID, 0, 20)
    assert q.wait_used()[0][1] == 21 and status(vm, 0) == S_OK
    assert vm.memory.read(DATA, 20) == b"pyvt-disk-0".ljust(20, b"\0")
    request(vm, q, 1, T_DISCARD, 0, 16)
    q.wait_used()
    assert status(vm, 1) == S_UNSUPP


def test_readonly_refuses_writes(vm, image):
    blk, q = open_disk(vm, image, readonly=True, size=16)
    try:
        before = image.read_bytes()
        request(vm, q, 0, T_OUT, 0, write_data=b"x" * 512)
        request(vm, q, 1, T_FLUSH, 0)
        request(vm, q, 2, T_IN, 0, 512)
        q.wait_used(3)
        assert [status(vm, i) for i in range(3)] == [S_IOERR, S_OK, S_OK]
        assert image.read_bytes() == before
        assert blk.readonly and blk.stats[0]["errors"] == 1
    finally:
        blk.stop()
        q.close()


def test_requests_past_the_disk_or_not_whole_sectors(vm, disk):
    blk, q = disk
    request(vm, q, 0, T_IN, SECTORS - 1, 1024)      # one sector past the end
    request(vm, q, 1, T_IN, 1 << 62, 512)           # far past, no overflow
    request(vm, q, 2, T_OUT, 0, write_data=b"y" * 100)
    request(vm, q, 3, T_IN, SECTORS - 1, 512)       # the last sector: fine
    q.wait_used(4)
    assert [status(vm, i) for i in range(4)] == [S_IOERR, S_IOERR, S_IOERR, S_OK]


def test_data_outside_ram_is_an_ioerr(vm, disk):
    blk, q = disk
    request(vm, q, 0, T_IN, 0, 512, data_gpa=(16 << 20) - 256)  # runs off RAM
    vm.memory.write(HDR + 16, struct.pack("<IIQ", T_OUT, 0, 0))
    q.add([(HDR + 16, 16, False), (1 << 36, 512, False), (STATUS + 1, 1, True)])
    q.wait_used(2)
    assert [status(vm, i) for i in range(2)] == [S_IOERR, S_IOERR]
    request(vm, q, 2, T_IN, 0, 512)
    q.wait_used()
    assert status(vm, 2) == S_OK


def test_header_outside_ram_or_too_short(vm, disk):
    blk, q = disk
    vm.memory.write(STATUS, b"\xee\xee")
    q.add([(1 << 40, 16, False), (STATUS, 1, True)])
    q.add([(HDR, 8, False), (STATUS + 1, 1, True)])
    q.wait_used(2)
    assert vm.memory.read(STATUS, 2) == bytes([S_IOERR, S_IOERR])


def test_no_status_byte_is_handed_back_unused(vm, disk):
    blk, q = disk
    head = q.add([(HDR, 16, False)])
    head2 = q.add([(HDR, 16, False), (1 << 40, 1, True)])
    assert q.wait_used(2) == [(head, 0), (head2, 0)]
    assert blk.stats[0]["errors"] == 2


def test_descriptor_loop(vm, disk):
    blk, q = disk
    q.write_desc(0, HDR, 16, VRING_DESC_F_NEXT, 1)
    q.write_desc(1, DATA, 512, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 0)
    q.free.remove(0)
    q.free.remove(1)
    q.publish(0)
    assert q.wait_used() == [(0, 0)]
    assert blk.stats[0]["errors"] == 1


def test_bad_arguments(vm, tmp_path):
    odd = tmp_path / "odd.img"
    odd.write_bytes(b"x" * 1000)
    with open(odd, "rb") as f:
        with pytest.raises(pyvt.ArgumentError, match="multiple of 512"):
            BlkWorker(vm.memory, f.fileno())
        assert BlkWorker(vm.memory, f, sector_count=2).sector_count == 2
        with pytest.raises(pyvt.ArgumentError, match="20 bytes"):
            BlkWorker(vm.memory, f.fileno(), sector_count=1, serial="x" * 21)
    with pytest.raises(pyvt.ArgumentError, match="not an open file descriptor"):
        BlkWorker(vm.memory, 9999)


def test_stress_many_requests(vm, disk, image):
    blk, q = disk
    expected = image.read_bytes()
    for round_ in range(20):
        heads = {}
        for i in range(60):
            sector = (round_ * 7 + i) % SECTORS
            heads[request(vm, q, i, T_IN, sector, 512, data_gpa=DATA + 512 * i,
                          kick=i % 5 == 4)] = (i, sector)
        done = q.wait_used(60)
        assert sorted(h for h, _ in done) == sorted(heads)
        for head, length in done:
            i, sector = heads[head]
            assert length == 513 and status(vm, i) == S_OK
            assert vm.memory.read(DATA + 512 * i, 512) == expected[sector * 512:(sector + 1) * 512]
    assert blk.stats[0]["requests"] == 1200 and blk.stats[0]["errors"] == 0


def test_read_into_a_device_readable_buffer_is_an_ioerr(vm, disk):
    blk, q = disk
    vm.memory.write(DATA, b"\x55" * 512)
    vm.memory.write(HDR, struct.pack("<IIQ", T_IN, 0, 0))
    vm.memory.write(STATUS, b"\xee")
    head = q.add([(HDR, 16, False), (DATA, 512, False), (STATUS, 1, True)])
    assert q.wait_used() == [(head, 1)]
    assert status(vm, 0) == S_IOERR
    assert vm.memory.read(DATA, 512) == b"\x55" * 512
    request(vm, q, 1, T_IN, 0, 0)          # no data at all
    request(vm, q, 2, T_GET_ID, 0, 0)      # nowhere to put the serial
    q.wait_used(2)
    assert [status(vm, 1), status(vm, 2)] == [S_IOERR, S_IOERR]


def test_fuzzed_rings_never_crash_the_worker(vm, image):
    """Random descriptor tables, available rings and indirect tables (flags,
    lengths, addresses in, across the end of, and far outside RAM): every
    chain is served or handed back, or the queue breaks; the used ring
    names only real heads; the process lives."""
    import random

    rnd = random.Random(15)
    fd = os.open(image, os.O_RDWR)
    blk = BlkWorker(vm.memory, fd)
    os.close(fd)
    q = Queue(vm.memory, RING, 32)
    try:
        for _ in range(150):
            blk.stop()
            q.attach(blk, 0)
            blk.set_features(rnd.choice([0, 1 << VIRTIO_RING_F_INDIRECT_DESC]) | 1 << VIRTIO_F_VERSION_1)
            # Headers the chains may point at: a mix of valid and silly requests.
            for i in range(8):
                vm.memory.write(HDR + 16 * i, struct.pack(
                    "<IIQ", rnd.choice([T_IN, T_IN, T_OUT, T_FLUSH, T_GET_ID, 99]), 0,
                    rnd.choice([0, 1, SECTORS - 1, SECTORS, 1 << 63])))
            places = [HDR + 16 * rnd.randrange(8), DATA + rnd.randrange(0, 0x10000),
                      (16 << 20) - rnd.randrange(1, 600), rnd.randrange(1 << 64), 0x400000]
            for index in range(32):
                q.write_desc(index, rnd.choice(places), rnd.choice([0, 1, 16, 512, 513, 4096, 1 << 31]),
                             rnd.randrange(8), rnd.randrange(40))
            for index in range(16):   # an indirect table at 0x400000
                q.write_desc(index, rnd.choice(places), rnd.choice([1, 16, 512]),
                             rnd.randrange(8), rnd.randrange(20), table=0x400000)
            count = rnd.randrange(1, 40)
            ring = struct.pack(f"<{32}H", *[rnd.randrange(36) for _ in range(32)])
            vm.memory.write(q.avail + 4, ring)
            vm.memory.write_int(q.avail + 2, count, 2)
            blk.start()
            q.kick()
            # Served, or the queue broke: either way the worker settles.
            deadline = time.monotonic() + 20
            while not (blk.stats[0]["broken"] or q.used_idx == count):
                assert time.monotonic() < deadline, (count, q.used_idx, blk.stats)
                time.sleep(0.001)
            for slot in range(min(q.used_idx, 32)):
                head = vm.memory.read_int(q.used + 4 + 8 * slot, 4)
                assert head < 32
        assert blk.stats[0]["errors"] > 0 and blk.stats[0]["requests"] > 0
    finally:
        blk.stop()
        q.close()
