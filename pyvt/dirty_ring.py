"""One vCPU's dirty ring (``KVM_CAP_DIRTY_LOG_RING``, KVM API documentation
8.29 "KVM_CAP_DIRTY_LOG_RING/KVM_CAP_DIRTY_LOG_RING_ACQ_REL"), for the thin
layer: :meth:`pyvt.kvm.VcpuFd.dirty_ring` makes it.

Once a VM has the capability (:meth:`pyvt.kvm.VmFd.enable_dirty_log_ring`),
KVM reports the pages each vCPU writes in a memory slot with
``KVM_MEM_LOG_DIRTY_PAGES`` as ``struct kvm_dirty_gfn`` entries of that
vCPU's ring, mapped ``KVM_DIRTY_LOG_PAGE_OFFSET`` pages into the vCPU fd.
Harvesting reads the dirty entries in order and flips them to RESET (with
the acquire/release ordering KVM_CAP_DIRTY_LOG_RING_ACQ_REL asks for: the C
side, csrc/dirty_ring.c, does it); then :meth:`pyvt.kvm.VmFd.reset_dirty_rings`
lets KVM re-protect those pages and reuse the entries.  Call it before
reading the harvested pages' contents.

KVM makes a vCPU exit (``KVM_EXIT_DIRTY_RING_FULL``) before its ring is
full, but a backend that runs many guest instructions between its checks
(PVM emulating ring-0 code) can overrun the ring: the oldest entries are
overwritten, and KVM's next entry is no longer where harvesting resumes.
A harvest notices (it finds the whole ring dirty), sets
:attr:`DirtyRing.lost` (pages were written that no entry names any more)
and from then on reads the whole ring, finding KVM's next entry from where
the dirty entries end, until it is back in step (csrc/dirty_ring.h).
"""

from __future__ import annotations

import mmap
from typing import Callable, List, Optional, Sequence, Tuple

from . import _native
from ._kvm import ffi, lib
from .errors import ClosedError, KvmError

PAGE_SIZE = mmap.PAGESIZE
#: Bytes of one ``struct kvm_dirty_gfn``.
ENTRY_SIZE = ffi.sizeof("struct kvm_dirty_gfn")


class DirtyRing:
    """The ring of ``size`` bytes (``size // 16`` entries) of the vCPU whose
    fd is ``vcpu_fd``: a shared mapping of it and where harvesting resumes."""

    def __init__(self, vcpu_fd: int, size: int, vcpu_index: int = 0):
        self.size = size
        self.entries = size // ENTRY_SIZE
        self.vcpu_index = vcpu_index
        #: Index of the next entry to look at (free-running, modulo 2**32).
        self.fetch = 0
        #: KVM overran the ring: some written pages were not reported.  Set
        #: by a harvest; whoever handles it (treating every page as
        #: written) clears it.
        self.lost = False
        # The whole ring was dirty at the last harvest: KVM may be ahead.
        self._overrun_suspected = False
        self._lap: Optional[Tuple[int, int]] = None
        #: Ring-full exits in a row that found nothing to harvest (see
        #: pyvt.memory.GuestMemory.harvest_dirty_rings).
        self.futile_exits = 0
        try:
            self._mapping: Optional[mmap.mmap] = mmap.mmap(
                vcpu_fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                offset=lib.KVM_DIRTY_LOG_PAGE_OFFSET * PAGE_SIZE)
        except OSError as e:
            raise KvmError("mmap(dirty ring)", e.errno,
                           f"vCPU {vcpu_index}'s dirty ring ({size} bytes at page "
                           f"{lib.KVM_DIRTY_LOG_PAGE_OFFSET} of its fd) cannot be mapped; "
                           "the VM needs KVM_CAP_DIRTY_LOG_RING enabled before the vCPU "
                           "was created") from None

    def __repr__(self) -> str:
        state = "closed" if self._mapping is None else f"fetch={self.fetch}"
        return f"<DirtyRing vCPU {self.vcpu_index}, {self.entries} entries, {state}>"

    @property
    def closed(self) -> bool:
        return self._mapping is None

    @property
    def mapping(self) -> mmap.mmap:
        """The shared mapping of the ring (``entries`` struct kvm_dirty_gfn)."""
        if self._mapping is None:
            raise ClosedError(f"vCPU {self.vcpu_index}'s dirty ring is closed")
        return self._mapping

    def gfn(self, index: int):
        """Entry ``index`` (modulo the ring size) as a cffi
        ``struct kvm_dirty_gfn`` copy: ``flags``, ``slot``, ``offset``."""
        entry = ffi.new("struct kvm_dirty_gfn *")
        at = (index % self.entries) * ENTRY_SIZE
        ffi.buffer(entry)[:] = self.mapping[at:at + ENTRY_SIZE]
        return entry[0]

    def harvest(self) -> List[Tuple[int, int]]:
        """The dirty entries since the last harvest, in order, as
        ``(slot, offset)`` pairs (``slot`` is ``address space << 16 | slot
        id``; ``offset`` is the page within the slot), each marked harvested.
        Call :meth:`pyvt.kvm.VmFd.reset_dirty_rings` next (and again if
        :meth:`finish_lap` says so)."""
        found: List[Tuple[int, int]] = []
        self._harvest(lambda: self._collect(found), found.extend)
        return found

    def _collect(self, found: List[Tuple[int, int]]) -> int:
        self.fetch, more = _native.dirty_ring_collect(self.mapping, self.entries, self.fetch)
        found.extend(more)
        return len(more)

    def harvest_into(self, bitmaps: Sequence[Optional[bytearray]]) -> Tuple[int, int]:
        """:meth:`harvest`, setting each page's bit in ``bitmaps[slot]`` (one
        bit per page of the slot; None for a slot to ignore).  Returns
        ``(entries harvested, stray)``: stray entries fell outside every
        bitmap."""
        bitmaps = list(bitmaps)
        strays = [0]

        def mark(pairs: List[Tuple[int, int]]) -> None:
            for slot, offset in pairs:
                bitmap = bitmaps[slot] if slot < len(bitmaps) else None
                if bitmap is None or offset >> 3 >= len(bitmap):
                    strays[0] += 1
                else:
                    bitmap[offset >> 3] |= 1 << (offset & 7)

        return self._harvest(lambda: self._mark(bitmaps, strays), mark), strays[0]

    def _mark(self, bitmaps: List[Optional[bytearray]], strays: List[int]) -> int:
        self.fetch, harvested, stray = _native.dirty_ring_mark(
            self.mapping, self.entries, self.fetch, bitmaps)
        strays[0] += stray
        return harvested

    def _harvest(self, collect: Callable[[], int],
                 take: Callable[[List[Tuple[int, int]]], None]) -> int:
        """In step with KVM, ``collect`` harvests in order from :attr:`fetch`;
        after an overrun, the whole ring is read (pvt_dirty_ring_recover)
        and its pairs go to ``take``.  Returns how many entries KVM may
        reset now."""
        consumed = 0
        if not self._overrun_suspected:
            consumed = collect()
            if consumed < self.entries:
                return consumed
            # The whole ring was dirty: KVM may have written over entries,
            # and be ahead of fetch.
            self.lost = self._overrun_suspected = True
        pairs, advance, all_dirty = _native.dirty_ring_recover(self.mapping, self.entries,
                                                               self.fetch)
        take(pairs)
        if all_dirty:
            self.lost = True
        elif pairs and advance == len(pairs):
            self._overrun_suspected = False  # the dirty run began at fetch: in step
        self._lap = (self.fetch, advance - self.entries) if advance > self.entries else None
        self.fetch = (self.fetch + advance) & 0xFFFFFFFF
        return consumed + advance

    def finish_lap(self) -> bool:
        """After the KVM_RESET_DIRTY_RINGS that follows a harvest: True if
        KVM's next entry was more than a lap ahead, in which case the rest
        is marked now and KVM_RESET_DIRTY_RINGS must be called again."""
        lap, self._lap = self._lap, None
        if lap is None:
            return False
        _native.dirty_ring_mark_harvested(self.mapping, self.entries, lap[0], lap[1])
        return True

    def skip_reset_entry(self) -> bool:
        """After an overrun KVM's next entry may lie beyond entries it has
        already reset, yet it counts them as used: while none of its new
        entries is visible, the vCPU can only be let run by moving KVM's
        reset index on.  Marks the entry at :attr:`fetch` harvested and
        moves past it (the next KVM_RESET_DIRTY_RINGS moves KVM's index with
        ours), and returns True; does nothing (False) unless an overrun was
        seen and the entry is empty.  Call only while KVM has stopped the
        vCPU for a full ring: then it is at least that one entry ahead."""
        if not self._overrun_suspected or self.gfn(self.fetch).flags != 0:
            return False
        # With the release store KVM_CAP_DIRTY_LOG_RING_ACQ_REL asks for.
        _native.dirty_ring_mark_harvested(self.mapping, self.entries, self.fetch, 1)
        self.fetch = (self.fetch + 1) & 0xFFFFFFFF
        self.lost = True
        return True

    def close(self) -> None:
        """Unmaps the ring (idempotent)."""
        mapping, self._mapping = self._mapping, None
        if mapping is not None:
            try:
                mapping.close()
            except BufferError:
                pass  # a harvest in another thread still reads it: unmapped after
