"""The errors of pyvt.virtio (defined in :mod:`pyvt.errors`, with the others)."""

from ..errors import DiskImageError, TapError, VirtioError, VirtqueueError

__all__ = ["DiskImageError", "TapError", "VirtioError", "VirtqueueError"]
