"""Bounds-checked memoryviews over guest RAM, for virtqueues.

A virtqueue's rings and buffers are guest-physical addresses the guest
chose: every one is checked against the VM's RAM regions before it is
touched, and a bad one is a :class:`pyvt.virtio.VirtqueueError` (the device
then needs a reset), never a host crash or a write outside guest memory.
"""

from __future__ import annotations

from typing import List, Tuple

from .. import pageset
from ..memory import PAGE_SIZE
from .errors import VirtqueueError


class GuestRam:
    """The RAM of ``memory`` (a :class:`pyvt.GuestMemory`) as memoryviews.

    The regions are read when it is made (a virtqueue makes one when the
    driver starts the device): RAM added later is not seen until the next
    start."""

    def __init__(self, memory):
        self._memory = memory
        self._regions = [r for r in memory.regions if r.mapping is not None]

    def layout(self) -> List[Tuple[int, int, int]]:
        """``[(guest_physical_address, size, host_address)]`` of every RAM
        region, as the native virtio workers take it."""
        return [(r.gpa, r.size, r.host_address) for r in self._regions]

    def view(self, gpa: int, length: int, writable: bool, what: str) -> List[memoryview]:
        """Memoryviews of ``[gpa, gpa + length)`` (one per region it crosses),
        or VirtqueueError naming ``what`` if any byte is not guest RAM (or,
        for ``writable``, is read-only RAM)."""
        if gpa < 0 or length < 0 or gpa + length > 1 << 64:
            raise VirtqueueError(f"{what}: {gpa:#x}+{length:#x} is not a guest address range")
        views = []
        at, left = gpa, length
        while left:
            region = next((r for r in self._regions if r.gpa <= at < r.end), None)
            if region is None:
                raise VirtqueueError(
                    f"{what}: {gpa:#x}-{gpa + length - 1:#x} is not all guest RAM "
                    f"({at:#x} is outside every memory region)")
            if writable and (region.readonly or not region.host_writable):
                raise VirtqueueError(f"{what}: {at:#x} is read-only memory the device must write")
            offset = at - region.gpa
            n = min(left, region.end - at)
            views.append(memoryview(region.buffer)[offset:offset + n])
            at += n
            left -= n
        return views

    def view1(self, gpa: int, length: int, writable: bool, what: str) -> memoryview:
        """One memoryview of ``[gpa, gpa + length)``, which must lie in one
        region (rings do: the driver allocates each in one piece)."""
        views = self.view(gpa, length, writable, what)
        if len(views) > 1:
            raise VirtqueueError(f"{what}: {gpa:#x}+{length:#x} spans two memory regions")
        return views[0] if views else memoryview(b"")

    def note_written(self, gpa: int, length: int) -> None:
        """Tells the VM's memory that the device wrote ``[gpa, gpa+length)``
        through a view, so that snapshot restores see it like vm.memory.write."""
        at, end = gpa, gpa + length
        for region in self._regions:
            lo, hi = max(at, region.gpa), min(end, region.end)
            if lo < hi and region.host_dirty is not None:
                pageset.mark(region.host_dirty, (lo - region.gpa) // PAGE_SIZE,
                             (hi - 1 - region.gpa) // PAGE_SIZE)
