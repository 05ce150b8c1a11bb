"""Bounds-checked memoryviews over guest RAM, for virtqueues.

A virtqueue's rings and buffers are guest-physical addresses the guest
chose: every one is checked against the VM's RAM regions before it is
touched, and a bad one is a :class:`pyvt.virtio.VirtqueueError` (the device
then needs a reset), never a host crash or a write outside guest memory.
"""

from __future__ import annotations

from typing import List

from .. import pageset
from ..errors import OutOfRangeError
from ..memory import PAGE_SIZE
from .errors import VirtqueueError


class GuestRam:
    """The RAM of ``memory`` (a :class:`pyvt.GuestMemory`) as memoryviews."""

    def __init__(self, memory):
        self._memory = memory

    def view(self, gpa: int, length: int, writable: bool, what: str) -> List[memoryview]:
        """Memoryviews of ``[gpa, gpa + length)`` (one per region it crosses),
        or VirtqueueError naming ``what`` if any byte is not guest RAM (or,
        for ``writable``, is read-only RAM)."""
        if gpa < 0 or length < 0 or gpa + length > 1 << 64:
            raise VirtqueueError(f"{what}: {gpa:#x}+{length:#x} is not a guest address range")
        try:
            pieces = self._memory._pieces(gpa, length)
        except OutOfRangeError as error:
            raise VirtqueueError(f"{what}: {gpa:#x}+{length:#x} is not all guest RAM "
                                 f"({error})") from None
        views = []
        for region, offset, n in pieces:
            if writable and (region.readonly or not region.host_writable):
                raise VirtqueueError(f"{what}: {region.gpa + offset:#x} is read-only memory "
                                     "the device must write")
            views.append(memoryview(region.buffer)[offset:offset + n])
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
        for region in self._memory.regions:
            lo, hi = max(at, region.gpa), min(end, region.end)
            if lo < hi and region.host_dirty is not None:
                pageset.mark(region.host_dirty, (lo - region.gpa) // PAGE_SIZE,
                             (hi - 1 - region.gpa) // PAGE_SIZE)
