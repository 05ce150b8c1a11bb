"""The native virtio-blk worker (pyvt._virtio.BlkWorker) against reading
the image directly, in-process, no guest code:

    python benchmarks/virtio_native.py [--rounds N] [--batch B]

A 16 MiB raw image (in the page cache) and a VM whose RAM holds one
virtqueue with B 4 KiB read requests laid out once (header, data,
status).  Each round re-publishes the B requests in the available ring,
kicks the worker's eventfd, and waits on its call eventfd until all B are
used: the time covers the worker's wake-up, chain walking, bounds checks,
preadv into guest RAM, used-ring updates and the interrupt.  The baseline
reads the same B blocks with os.preadv into buffers in a Python loop (one
syscall each, no queue).  Also one request alone (kick -> interrupt), the
round trip a guest's synchronous read sees, minus the VM exits.

Medians; the ratio is worker / direct preadv per request.
"""

from __future__ import annotations

import argparse
import os
import select
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import pyvt  # noqa: E402
from pyvt._virtio import BlkWorker  # noqa: E402
from virtio_native_driver import VIRTIO_F_VERSION_1, Queue, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE  # noqa: E402

BLOCK = 4096
IMAGE = 16 << 20
RING, HDR, STATUS, DATA = 0x10000, 0x200000, 0x210000, 0x400000


class Bench:
    def __init__(self, batch: int):
        self.batch = batch
        self.tmp = tempfile.NamedTemporaryFile(prefix="pyvt-bench-", suffix=".img")
        self.tmp.write(os.urandom(IMAGE))
        self.tmp.flush()
        self.fd = os.open(self.tmp.name, os.O_RDONLY)
        os.pread(self.fd, IMAGE, 0)  # into the page cache
        self.vm = pyvt.Vm("64M")
        self.worker = BlkWorker(self.vm.memory, self.fd, readonly=True)
        self.q = Queue(self.vm.memory, RING, 4 * batch)
        self.q.attach(self.worker, 0)
        self.worker.set_features(1 << VIRTIO_F_VERSION_1)
        self.worker.start()
        # Request i uses descriptors 3i..3i+2, for good.
        for i in range(batch):
            d = 3 * i
            self.q.write_desc(d, HDR + 16 * i, 16, VRING_DESC_F_NEXT, d + 1)
            self.q.write_desc(d + 1, DATA + BLOCK * i, BLOCK, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, d + 2)
            self.q.write_desc(d + 2, STATUS + i, 1, VRING_DESC_F_WRITE)
        self.poller = select.poll()
        self.poller.register(self.q.call_fd, select.POLLIN)
        self.buffers = [bytearray(BLOCK) for _ in range(batch)]
        self.round_no = 0

    def offsets(self, count: int):
        base = (self.round_no * count) % (IMAGE // BLOCK - count)
        return [(base + i) * BLOCK for i in range(count)]

    def through_worker(self, count: int) -> float:
        """Seconds from the kick to the last of `count` requests used."""
        q, mem = self.q, self.vm.memory
        offsets = self.offsets(count)
        mem.write(HDR, b"".join(struct.pack("<IIQ", 0, 0, off // 512) for off in offsets))
        slot = q.avail_idx % q.size
        if slot + count > q.size:  # keep the batch contiguous in the ring
            q.avail_idx = (q.avail_idx + q.size - slot) & 0xFFFF
            q.used_seen = q.avail_idx
            slot = 0
        mem.write(q.avail + 4 + 2 * slot, b"".join(struct.pack("<H", 3 * i) for i in range(count)))
        target = (q.avail_idx + count) & 0xFFFF
        start = time.perf_counter()
        mem.write_int(q.avail + 2, target, 2)
        os.eventfd_write(q.kick_fd, 1)
        while q.used_idx != target:
            self.poller.poll(10000)
            q.interrupts()
        elapsed = time.perf_counter() - start
        q.avail_idx = q.used_seen = target
        self.round_no += 1
        return elapsed

    def direct(self, count: int) -> float:
        offsets = self.offsets(count)
        buffers = self.buffers
        preadv, fd = os.preadv, self.fd
        start = time.perf_counter()
        for i in range(count):
            preadv(fd, [buffers[i]], offsets[i])
        elapsed = time.perf_counter() - start
        self.round_no += 1
        return elapsed

    def check(self) -> None:
        """The worker's data is the image's."""
        self.through_worker(self.batch)
        self.round_no -= 1
        offsets = self.offsets(self.batch)
        for i, off in enumerate(offsets):
            assert self.vm.memory.read(DATA + BLOCK * i, BLOCK) == os.pread(self.fd, BLOCK, off)
            assert self.vm.memory.read(STATUS + i, 1) == b"\0"

    def close(self) -> None:
        self.worker.stop()
        self.q.close()
        self.vm.close()
        os.close(self.fd)
        self.tmp.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args(argv)
    bench = Bench(args.batch)
    try:
        bench.check()
        rows = []
        for label, count in ((f"batch of {args.batch}", args.batch), ("one request", 1)):
            worker, direct = [], []
            for _ in range(args.rounds):  # alternate, so drift hits both alike
                worker.append(bench.through_worker(count) / count)
                direct.append(bench.direct(count) / count)
            rows.append((label, statistics.median(worker), statistics.median(direct)))
        print(f"virtio-blk 4 KiB reads, {args.rounds} rounds, medians per request")
        print(f"{'':<16}{'worker us':>12}{'req/s':>12}{'preadv us':>12}{'req/s':>12}{'ratio':>8}")
        for label, w, d in rows:
            print(f"{label:<16}{w * 1e6:>12.2f}{1 / w:>12.0f}{d * 1e6:>12.2f}{1 / d:>12.0f}{w / d:>8.2f}")
        stats = bench.worker.stats[0]
        print(f"worker: {stats['requests']} requests, {stats['errors']} errors, "
              f"{stats['notifies']} interrupts, {stats['kicks']} kicks")
    finally:
        bench.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
