"""Split virtqueues (virtio 1.x section 2.7) served from Python.

A :class:`Virtqueue` reads the chains the driver makes available, as
:class:`Chain` objects whose buffers are memoryviews straight over guest RAM
(no copy), puts served chains on the used ring, and decides (with
``VIRTIO_F_EVENT_IDX`` or the avail ring's NO_INTERRUPT flag) whether the
guest wants an interrupt for them.

Every address and length the guest wrote is checked (:class:`GuestRam`): a
bad one raises :class:`VirtqueueError` and leaves the queue ``broken``; the
transport then sets DEVICE_NEEDS_RESET.  Nothing outside guest RAM is read
or written.
"""

from __future__ import annotations

import struct
from typing import Callable, Iterator, List, Optional

from ..errors import ArgumentError
from .constants import (
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
)
from .errors import VirtqueueError
from .guest_ram import GuestRam

_DESC = struct.Struct("<QIHH")   # addr, len, flags, next
_USED_ELEM = struct.Struct("<II")  # id, len
MAX_QUEUE_SIZE = 32768


def check_queue_size(size: int) -> int:
    """``size`` if it is a valid split-queue size (a power of 2, 1-32768)."""
    if isinstance(size, bool) or not isinstance(size, int) or not 0 < size <= MAX_QUEUE_SIZE \
            or size & (size - 1):
        raise ArgumentError(f"a virtqueue size must be a power of 2 from 1 to {MAX_QUEUE_SIZE}, "
                            f"not {size!r}")
    return size


class Chain:
    """One descriptor chain the driver made available: the device reads
    ``readable`` and writes ``writable`` (lists of memoryviews over guest RAM,
    in chain order), then returns it with :meth:`Virtqueue.push`.

    :meth:`read` and :meth:`write` treat each side as one stream;
    ``written`` counts what :meth:`write` wrote (what ``push`` reports to the
    driver unless told otherwise)."""

    def __init__(self, head: int, readable: List[memoryview], writable: List[memoryview],
                 writable_at: List[int]):
        self.head = head
        self.readable = readable
        self.writable = writable
        self._writable_at = writable_at  # each writable view's guest address
        self.written = 0

    @property
    def readable_size(self) -> int:
        return sum(len(v) for v in self.readable)

    @property
    def writable_size(self) -> int:
        return sum(len(v) for v in self.writable)

    def read(self, n: Optional[int] = None, offset: int = 0) -> bytes:
        """The readable side's bytes from ``offset`` (``n`` of them, or all)."""
        data = b"".join(bytes(v) for v in self.readable)
        end = len(data) if n is None else offset + n
        return data[offset:end]

    def write(self, data) -> int:
        """Appends ``data`` to the writable side after what was written
        before; ArgumentError if it does not fit (``writable_size`` says how
        much the driver gave).  Returns the bytes written so far."""
        data = memoryview(data).cast("B")
        if self.written + len(data) > self.writable_size:
            raise ArgumentError(
                f"chain {self.head}: {len(data)} bytes do not fit in the "
                f"{self.writable_size - self.written} writable bytes left")
        skip, done = self.written, 0
        for view in self.writable:
            if skip >= len(view):
                skip -= len(view)
                continue
            n = min(len(view) - skip, len(data) - done)
            view[skip:skip + n] = data[done:done + n]
            done += n
            skip = 0
            if done == len(data):
                break
        self.written += len(data)
        return self.written

    def __repr__(self) -> str:
        return (f"Chain(head={self.head}, readable={self.readable_size}, "
                f"writable={self.writable_size}, written={self.written})")


class Virtqueue:
    """A split virtqueue of ``size`` entries whose descriptor table, driver
    (avail) area and device (used) area are at guest-physical ``desc``,
    ``avail`` and ``used`` of ``memory`` (a :class:`pyvt.GuestMemory` or a
    :class:`GuestRam`).

    ``event_idx`` and ``indirect`` say whether VIRTIO_F_EVENT_IDX and
    VIRTIO_F_INDIRECT_DESC were negotiated.  ``interrupt`` is called (with no
    argument) when :meth:`notify` decides the guest wants one.
    ``last_avail`` and ``used_idx`` resume a queue where it stopped.
    """

    def __init__(self, memory, size: int, desc: int, avail: int, used: int, *,
                 index: int = 0, event_idx: bool = False, indirect: bool = False,
                 interrupt: Optional[Callable[[], None]] = None,
                 last_avail: int = 0, used_idx: int = 0):
        self.ram = memory if isinstance(memory, GuestRam) else GuestRam(memory)
        self.size = check_queue_size(size)
        self.index = index
        self.event_idx = event_idx
        self.indirect = indirect
        self._interrupt = interrupt
        self.broken: Optional[str] = None
        self._check_alignment(desc, 16, "descriptor table")
        self._check_alignment(avail, 2, "driver area")
        self._check_alignment(used, 4, "device area")
        self._desc = self.ram.view1(desc, 16 * size, False, f"queue {index} descriptor table")
        # avail: flags, idx, ring[size], used_event
        self._avail = self.ram.view1(avail, 6 + 2 * size, False, f"queue {index} driver area").cast("H")
        # used: flags, idx, ring[size] of (id, len), avail_event
        self._used_gpa = used
        used_bytes = self.ram.view1(used, 6 + 8 * size, True, f"queue {index} device area")
        self._used = used_bytes
        self._used16 = used_bytes.cast("H")
        self.last_avail = last_avail & 0xFFFF
        self.used_idx = used_idx & 0xFFFF
        self._signalled = self.used_idx  # used index at the last interrupt decision

    def _check_alignment(self, gpa: int, align: int, what: str) -> None:
        if gpa % align:
            raise VirtqueueError(f"queue {self.index} {what} at {gpa:#x} is not "
                                 f"{align}-byte aligned")

    # -- the driver's side --------------------------------------------------

    @property
    def avail_idx(self) -> int:
        """The driver's avail index (free-running, mod 2**16)."""
        return self._avail[1]

    @property
    def pending(self) -> int:
        """How many chains the driver has made available and the device not
        yet taken."""
        return (self.avail_idx - self.last_avail) & 0xFFFF

    def pop(self) -> Optional[Chain]:
        """The next available chain, or None.  VirtqueueError (and the queue
        ``broken``) if the driver's avail index or chain is bad."""
        self._check_usable()
        try:
            pending = self.pending
            if pending == 0:
                return None
            if pending > self.size:
                raise VirtqueueError(
                    f"queue {self.index}: the driver's avail index {self.avail_idx} is "
                    f"{pending} ahead of the device's {self.last_avail}, more than the "
                    f"queue's {self.size} entries")
            head = self._avail[2 + self.last_avail % self.size]
            chain = self._chain(head)
        except VirtqueueError as error:
            self.broken = str(error)
            raise
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        return chain

    def __iter__(self) -> Iterator[Chain]:
        """Pops chains until none is available."""
        while True:
            chain = self.pop()
            if chain is None:
                return
            yield chain

    def _chain(self, head: int) -> Chain:
        if head >= self.size:
            raise VirtqueueError(f"queue {self.index}: chain head {head} is past the "
                                 f"queue's {self.size} descriptors")
        readable: List[memoryview] = []
        writable: List[memoryview] = []
        writable_at: List[int] = []
        table, table_size, what = self._desc, self.size, "descriptor"
        index, seen, indirect_seen = head, 0, False
        while True:
            seen += 1
            if seen > table_size:
                raise VirtqueueError(f"queue {self.index}: chain {head} loops (more than "
                                     f"{table_size} {what}s)")
            addr, length, flags, next_index = _DESC.unpack_from(table, 16 * index)
            if flags & VIRTQ_DESC_F_INDIRECT:
                if not self.indirect:
                    raise VirtqueueError(f"queue {self.index}: chain {head} uses an indirect "
                                         "table, but VIRTIO_F_INDIRECT_DESC was not negotiated")
                if indirect_seen or table is not self._desc:
                    raise VirtqueueError(f"queue {self.index}: chain {head} nests an indirect "
                                         "table in another one or in a chain")
                if flags & VIRTQ_DESC_F_NEXT or readable or writable:
                    raise VirtqueueError(f"queue {self.index}: chain {head}: an indirect "
                                         "descriptor must be the chain's only one")
                if length == 0 or length % 16:
                    raise VirtqueueError(f"queue {self.index}: chain {head}: indirect table "
                                         f"length {length} is not a nonzero multiple of 16")
                table = self.ram.view1(addr, length, False,
                                       f"queue {self.index} chain {head} indirect table")
                table_size, what, index, seen = length // 16, "indirect descriptor", 0, 0
                indirect_seen = True
                continue
            where = f"queue {self.index} chain {head} {what} {index}"
            if flags & VIRTQ_DESC_F_WRITE:
                views = self.ram.view(addr, length, True, where)
                offset = addr
                for view in views:
                    writable.append(view)
                    writable_at.append(offset)
                    offset += len(view)
            else:
                if writable:
                    raise VirtqueueError(f"{where}: a device-readable buffer after a "
                                         "device-writable one")
                readable.extend(self.ram.view(addr, length, False, where))
            if not flags & VIRTQ_DESC_F_NEXT:
                break
            if next_index >= table_size:
                raise VirtqueueError(f"{where}: next {next_index} is past the "
                                     f"{table_size} {what}s")
            index = next_index
        return Chain(head, readable, writable, writable_at)

    # -- the device's side --------------------------------------------------

    def push(self, chain: Chain, written: Optional[int] = None) -> None:
        """Returns ``chain`` to the driver on the used ring, saying it wrote
        ``written`` bytes (default ``chain.written``).  Call :meth:`notify`
        after a batch to interrupt the guest if it wants."""
        self._check_usable()
        written = chain.written if written is None else written
        if not 0 <= written <= chain.writable_size:
            raise ArgumentError(f"chain {chain.head}: written={written} is not within its "
                                f"{chain.writable_size} writable bytes")
        slot = self.used_idx % self.size
        _USED_ELEM.pack_into(self._used, 4 + 8 * slot, chain.head, written)
        left = written
        for view, gpa in zip(chain.writable, chain._writable_at, strict=True):
            if left <= 0:
                break
            self.ram.note_written(gpa, min(left, len(view)))
            left -= len(view)
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        self._used16[1] = self.used_idx  # after the element: the driver reads idx first
        self.ram.note_written(self._used_gpa, 6 + 8 * self.size)

    def needs_interrupt(self) -> bool:
        """Whether the used entries pushed since the last decision call for an
        interrupt: with EVENT_IDX, when the index passed the driver's
        used_event; without, unless the driver set NO_INTERRUPT.  Each call
        decides for the entries since the previous one."""
        old, new = self._signalled, self.used_idx
        self._signalled = new
        if old == new:
            return False
        if self.event_idx:
            used_event = self._avail[2 + self.size]
            return (new - used_event - 1) & 0xFFFF < (new - old) & 0xFFFF
        return not self._avail[0] & VIRTQ_AVAIL_F_NO_INTERRUPT

    def notify(self) -> bool:
        """Interrupts the guest if :meth:`needs_interrupt`; returns whether it did.
        With EVENT_IDX it also asks the driver to notify the device at its
        next new chain (avail_event = the device's position)."""
        if self.event_idx and self.broken is None:
            self._used16[2 + 4 * self.size] = self.last_avail
        needed = self.needs_interrupt()
        if needed and self._interrupt is not None:
            self._interrupt()
        return needed

    def _check_usable(self) -> None:
        if self.broken is not None:
            raise VirtqueueError(f"queue {self.index} is broken ({self.broken}); the driver "
                                 "must reset the device")

    def __repr__(self) -> str:
        state = f", broken: {self.broken}" if self.broken else ""
        return (f"Virtqueue(index={self.index}, size={self.size}, last_avail={self.last_avail}, "
                f"used_idx={self.used_idx}{state})")
