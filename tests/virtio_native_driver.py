"""A minimal virtio driver for the native worker tests: split virtqueues
laid out in a Vm's memory from Python, as a guest's driver would (virtio 1.x
2.7), with eventfds for kicks and interrupts.  No guest code runs."""

from __future__ import annotations

import os
import select
import struct
import time
from typing import List, Optional, Sequence, Tuple

VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4
VRING_AVAIL_F_NO_INTERRUPT = 1
VRING_USED_F_NO_NOTIFY = 1
VIRTIO_F_VERSION_1 = 32
VIRTIO_RING_F_INDIRECT_DESC = 28
VIRTIO_RING_F_EVENT_IDX = 29

#: (gpa, length, device-writable)
Buffer = Tuple[int, int, bool]


class Queue:
    """One split virtqueue at ``base`` in guest memory, with its kick and
    call eventfds.  ``add()`` makes a chain available; ``wait_used()``
    waits for the device to hand chains back."""

    def __init__(self, memory, base: int, size: int):
        self.memory = memory
        self.size = size
        self.desc = base
        self.avail = base + 16 * size
        self.used = (self.avail + 6 + 2 * size + 3) & ~3
        self.end = self.used + 6 + 8 * size
        memory.write(base, bytes(self.end - base))
        self.free = list(range(size))
        self.avail_idx = 0
        self.used_seen = 0
        self.kick_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.call_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)

    def close(self) -> None:
        os.close(self.kick_fd)
        os.close(self.call_fd)

    def attach(self, worker, index: int) -> None:
        worker.set_queue(index, self.size, self.desc, self.avail, self.used,
                         self.kick_fd, self.call_fd)

    def write_desc(self, index: int, gpa: int, length: int, flags: int, next_: int = 0,
                   table: Optional[int] = None) -> None:
        base = self.desc if table is None else table
        self.memory.write(base + 16 * index, struct.pack("<QIHH", gpa, length, flags, next_))

    def add(self, buffers: Sequence[Buffer], kick: bool = True) -> int:
        """Chains ``buffers`` through free descriptors; returns the head."""
        ids = [self.free.pop(0) for _ in buffers]
        for i, (gpa, length, writable) in enumerate(buffers):
            last = i == len(buffers) - 1
            flags = (VRING_DESC_F_WRITE if writable else 0) | (0 if last else VRING_DESC_F_NEXT)
            self.write_desc(ids[i], gpa, length, flags, 0 if last else ids[i + 1])
        self.publish(ids[0], kick)
        return ids[0]

    def add_indirect(self, buffers: Sequence[Buffer], table: int, kick: bool = True) -> int:
        """One descriptor pointing at an indirect table at ``table``."""
        for i, (gpa, length, writable) in enumerate(buffers):
            last = i == len(buffers) - 1
            flags = (VRING_DESC_F_WRITE if writable else 0) | (0 if last else VRING_DESC_F_NEXT)
            self.write_desc(i, gpa, length, flags, 0 if last else i + 1, table=table)
        head = self.free.pop(0)
        self.write_desc(head, table, 16 * len(buffers), VRING_DESC_F_INDIRECT)
        self.publish(head, kick)
        return head

    def publish(self, head: int, kick: bool = True) -> None:
        """Puts ``head`` in the available ring, then moves its index (x86
        keeps stores in order: the ring entry is seen first)."""
        self.memory.write_int(self.avail + 4 + 2 * (self.avail_idx % self.size), head, 2)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.memory.write_int(self.avail + 2, self.avail_idx, 2)
        if kick:
            self.kick()

    def kick(self) -> None:
        os.eventfd_write(self.kick_fd, 1)

    def set_avail_flags(self, flags: int) -> None:
        self.memory.write_int(self.avail, flags, 2)

    def set_used_event(self, value: int) -> None:
        self.memory.write_int(self.avail + 4 + 2 * self.size, value, 2)

    @property
    def avail_event(self) -> int:
        return self.memory.read_int(self.used + 4 + 8 * self.size, 2)

    @property
    def used_flags(self) -> int:
        return self.memory.read_int(self.used, 2)

    @property
    def used_idx(self) -> int:
        return self.memory.read_int(self.used + 2, 2)

    def interrupts(self) -> int:
        """How many times the device wrote the call eventfd since last asked."""
        try:
            return os.eventfd_read(self.call_fd)
        except BlockingIOError:
            return 0

    def wait_used(self, count: int = 1, timeout: float = 20.0,
                  interrupts: bool = True) -> List[Tuple[int, int]]:
        """Waits until ``count`` more chains are used; returns their (id,
        len) and frees their descriptors.  With ``interrupts``, it waits on
        the call eventfd (a lost interrupt fails the test), else it polls
        the used index."""
        poller = select.poll()
        poller.register(self.call_fd, select.POLLIN)
        deadline = time.monotonic() + timeout
        while (self.used_idx - self.used_seen) & 0xFFFF < count:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(
                    f"the device used {(self.used_idx - self.used_seen) & 0xFFFF} of {count} "
                    f"chains in {timeout} s" + (" (or sent no interrupt)" if interrupts else ""))
            if interrupts:
                # Only an interrupt makes us look again: a lost one times out.
                if poller.poll(left * 1000):
                    self.interrupts()
            else:
                time.sleep(min(left, 0.01))
        done = []
        for _ in range(count):
            slot = self.used + 4 + 8 * (self.used_seen % self.size)
            ident, length = struct.unpack("<II", self.memory.read(slot, 8))
            done.append((ident, length))
            self.used_seen = (self.used_seen + 1) & 0xFFFF
            self.release(ident)
        return done

    def release(self, head: int) -> None:
        """Frees the descriptors of the chain at ``head`` (direct chains)."""
        index = head
        for _ in range(self.size):
            if index not in self.free:
                self.free.append(index)
            flags, next_ = struct.unpack("<HH", self.memory.read(self.desc + 16 * index + 12, 4))
            if not flags & VRING_DESC_F_NEXT:
                break
            index = next_
