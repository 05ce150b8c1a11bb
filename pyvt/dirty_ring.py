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
overwritten.  A harvest notices (it finds the whole ring dirty, or KVM's
entries further on than where it stopped), gets back in step with KVM, and
sets :attr:`DirtyRing.lost`: pages were written that no entry names any more.
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
        Call :meth:`pyvt.kvm.VmFd.reset_dirty_rings` next."""
        found: List[Tuple[int, int]] = []
        self._harvest(lambda: self._collect(found))
        return found

    def _collect(self, found: List[Tuple[int, int]]) -> int:
        self.fetch, more = _native.dirty_ring_collect(self.mapping, self.entries, self.fetch)
        found.extend(more)
        return len(more)

    def harvest_into(self, bitmaps: Sequence[Optional[bytearray]]) -> Tuple[int, int]:
        """:meth:`harvest`, setting each page's bit in ``bitmaps[slot]`` (one
        bit per page of the slot; None for a slot to ignore).  Returns
        ``(harvested, stray)``: stray entries fell outside every bitmap."""
        bitmaps = list(bitmaps)
        strays = [0]
        return self._harvest(lambda: self._mark(bitmaps, strays)), strays[0]

    def _mark(self, bitmaps: List[Optional[bytearray]], strays: List[int]) -> int:
        self.fetch, harvested, stray = _native.dirty_ring_mark(
            self.mapping, self.entries, self.fetch, bitmaps)
        strays[0] += stray
        return harvested

    def _harvest(self, collect: Callable[[], int]) -> int:
        """Runs ``collect`` (one harvest from :attr:`fetch`), noticing and
        getting over an overrun; returns how many entries were harvested."""
        harvested = collect()
        if harvested >= self.entries:  # all dirty: KVM may have written over some
            self.lost = self._overrun_suspected = True
        elif harvested:
            self._overrun_suspected = False  # KVM's next entry was where we looked
        if self._overrun_suspected:
            self.fetch, skipped = _native.dirty_ring_resync(self.mapping, self.entries,
                                                            self.fetch)
            if skipped:
                self.lost = True
                self._overrun_suspected = False
                harvested += collect()
        return harvested

    def close(self) -> None:
        """Unmaps the ring (idempotent)."""
        mapping, self._mapping = self._mapping, None
        if mapping is not None:
            try:
                mapping.close()
            except BufferError:
                pass  # a harvest in another thread still reads it: unmapped after
