"""Raw (flat) binaries: the bytes at an address, entered there."""

from __future__ import annotations

from typing import Optional

from .. import modes
from .common import Image, LoaderError, Segment, as_bytes, check_placement, write_segments

DEFAULT_ADDRESS = 0x100000


def load_flat(memory, data: bytes, address: int = DEFAULT_ADDRESS,
              mode: str = "long", entry: Optional[int] = None) -> Image:
    """Writes ``data`` at ``address``; the entry is ``entry`` (default:
    ``address``) in ``mode`` (real, protected or long)."""
    data = as_bytes(data, "flat image")
    modes.check_mode(mode)
    if not data:
        raise LoaderError("the flat image is empty")
    if isinstance(address, bool) or not isinstance(address, int) or address < 0:
        raise LoaderError(f"load address must be a non-negative int, not {address!r}")
    entry = address if entry is None else entry
    if not address <= entry < address + len(data):
        raise LoaderError(f"entry {entry:#x} is outside the image "
                          f"{address:#x}-{address + len(data) - 1:#x}")
    if mode == "real" and address + len(data) > 0x100000:
        raise LoaderError("a real-mode image must end below 1 MiB")
    segments = [Segment(address, data, len(data))]
    check_placement(segments, memory.size, "flat image")
    write_segments(memory, segments)
    return Image("flat", entry, mode, segments)
