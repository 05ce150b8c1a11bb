"""Which guest pages were written: KVM's dirty ring or its dirty bitmap,
behind one interface (:meth:`pyvt.memory.GuestMemory.dirty_pages`).

KVM logs the guest's writes to memory slots with ``KVM_MEM_LOG_DIRTY_PAGES``
in one of two ways, chosen per VM:

- the bitmap (the default): ``KVM_GET_DIRTY_LOG`` returns, per slot, one bit
  per page written since the last call and write-protects those pages again.
  Its cost follows the slot's size;
- the dirty ring (``pyvt.Vm(dirty_ring=...)``, KVM API documentation 8.29):
  each vCPU appends the pages it writes to its own ring; harvesting reads
  the new entries and ``KVM_RESET_DIRTY_RINGS`` re-protects their pages.
  Its cost follows the number of pages written.  A vCPU whose ring fills up
  exits (``KVM_EXIT_DIRTY_RING_FULL``); pyvt's run loop harvests and goes on.
  Where the backend overran a ring anyway (:mod:`pyvt.dirty_ring`), every
  page of the VM counts as written: a restore copies more, never too little.

Both give the same answer; a VM with a ring cannot use the bitmap (KVM
refuses ``KVM_GET_DIRTY_LOG``).  Writes made by the host (through
``vm.memory.write``) are added by :mod:`pyvt.memory`.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass
from typing import Dict, Iterator, List, Tuple

from . import pageset

PAGE_SIZE = mmap.PAGESIZE


@dataclass(frozen=True)
class DirtyPages:
    """The pages of one memory region written since the last
    :meth:`~pyvt.memory.GuestMemory.dirty_pages`.

    ``gpa`` and ``size`` say which region; ``pages`` is the set as a
    :mod:`pyvt.pageset` (bit n: the page at ``gpa + n * PAGE_SIZE``).
    Iterating gives the guest-physical addresses of the pages, ascending.
    """

    gpa: int
    size: int
    pages: int

    def __iter__(self) -> Iterator[int]:
        for first, count in pageset.runs(self.pages):
            yield from range(self.gpa + first * PAGE_SIZE,
                             self.gpa + (first + count) * PAGE_SIZE, PAGE_SIZE)

    def __len__(self) -> int:
        return self.pages.bit_count()

    def __bool__(self) -> bool:
        return self.pages != 0

    def __contains__(self, address: object) -> bool:
        """Whether the page holding guest-physical ``address`` is in the set."""
        if not isinstance(address, int) or not self.gpa <= address < self.gpa + self.size:
            return False
        return bool(self.pages >> ((address - self.gpa) // PAGE_SIZE) & 1)

    def runs(self) -> List[Tuple[int, int]]:
        """``(gpa, bytes)`` of each stretch of consecutive written pages."""
        return [(self.gpa + first * PAGE_SIZE, count * PAGE_SIZE)
                for first, count in pageset.runs(self.pages)]

    def __repr__(self) -> str:
        return (f"DirtyPages(region {self.gpa:#x}-{self.gpa + self.size - 1:#x}, "
                f"{len(self)} page(s))")


def harvest_bitmap(vm_fd, regions, rings=None) -> Dict[int, int]:
    """``KVM_GET_DIRTY_LOG`` of each of ``regions`` that logs its writes:
    {slot: pages written since the last harvest}."""
    found = {}
    for region in regions:
        if region.dirty_logging:
            found[region.slot] = int.from_bytes(
                vm_fd.get_dirty_log(region.slot, region.pages), "little")
    return found


def harvest_rings(vm_fd, regions, rings=None) -> Dict[int, int]:
    """Every vCPU's dirty ring (or those of ``rings``), then
    ``KVM_RESET_DIRTY_RINGS`` (before anyone reads the pages, as KVM asks):
    {slot: pages written since the last harvest}, for every region in
    ``regions`` (a ring holds all slots)."""
    by_slot = {region.slot: region for region in regions if region.dirty_logging}
    bitmaps: List = [None] * (max(by_slot, default=-1) + 1)
    for slot, region in by_slot.items():
        bitmaps[slot] = bytearray(pageset.bitmap_bytes(region.pages))
    harvested, lost = 0, False
    rings = vm_fd.dirty_rings() if rings is None else rings
    for ring in rings:
        harvested += ring.harvest_into(bitmaps)[0]
        lost, ring.lost = lost or ring.lost, False
    if harvested or lost:
        vm_fd.reset_dirty_rings()
        if [ring for ring in rings if ring.finish_lap()]:  # every ring's, before resetting
            vm_fd.reset_dirty_rings()
    if not harvested and not lost:
        return {}
    if lost:
        # KVM overran a ring (see pyvt.dirty_ring): which pages its lost
        # entries named is unknown, so every page counts as written.
        return {slot: pageset.whole(region.pages) for slot, region in by_slot.items()}
    return {slot: int.from_bytes(bitmaps[slot], "little") for slot in by_slot}


def harvester(vm_fd):
    """The harvest function for ``vm_fd``'s way of logging writes."""
    return harvest_rings if vm_fd.dirty_ring_size else harvest_bitmap
