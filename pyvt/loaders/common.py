"""What the loaders share: the image description, errors, placement checks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from .. import modes
from ..errors import Error

#: Guest-physical ranges [start, end) that kernels must not be loaded into,
#: and why.  The loaders' own data (multiboot information) goes in
#: :data:`pyvt.loaders.multiboot.INFO_AREA`; ACPI tables in the BIOS area.
RESERVED: List[Tuple[int, int, str]] = [
    (modes.SETUP_AREA_START, modes.SETUP_AREA_END,
     "pyvt's GDT and page tables (pyvt.modes.SETUP_AREA)"),
    (0xA0000, 0x100000, "the PC's VGA/BIOS hole, where the ACPI tables live"),
]


class LoaderError(Error, ValueError):
    """A kernel image cannot be loaded as it is; the message says why and
    what to change."""


@dataclass(frozen=True)
class Segment:
    """One piece of a loaded image: ``data`` at ``address``, then zeros up
    to ``address + size`` (bss)."""

    address: int
    data: bytes
    size: int

    @property
    def end(self) -> int:
        return self.address + self.size


@dataclass
class Image:
    """A loaded kernel: where it is and how to enter it.

    ``mode`` is the pyvt CPU mode for the entry (``real``, ``protected``,
    ``long``); ``registers`` the general registers to set at entry (for
    multiboot: ``eax`` = 0x2BADB002, ``ebx`` = the info structure).
    """

    kind: str
    entry: int
    mode: str
    segments: List[Segment]
    registers: dict = field(default_factory=dict)
    info_address: Optional[int] = None
    modules: List[Tuple[int, int]] = field(default_factory=list)  # (start, end)

    @property
    def start(self) -> int:
        return min(s.address for s in self.segments)

    @property
    def end(self) -> int:
        """First byte after the image, bss included."""
        return max(s.end for s in self.segments)


def overlaps(a_start: int, a_end: int, b_start: int, b_end: int) -> bool:
    return a_start < b_end and b_start < a_end


def check_placement(segments: List[Segment], ram_size: int, what: str,
                    reserved: Optional[List[Tuple[int, int, str]]] = None) -> None:
    """Raises LoaderError unless every segment is in RAM, clear of the
    reserved ranges and of the other segments."""
    reserved = RESERVED if reserved is None else reserved
    for seg in segments:
        if seg.size == 0:
            continue
        if seg.address < 0 or seg.end > ram_size:
            raise LoaderError(
                f"{what}: segment {seg.address:#x}-{seg.end - 1:#x} lies outside guest RAM "
                f"(0-{ram_size - 1:#x}); give the VM more memory (--memory) or link the "
                "kernel lower")
        for start, end, why in reserved:
            if overlaps(seg.address, seg.end, start, end):
                raise LoaderError(
                    f"{what}: segment {seg.address:#x}-{seg.end - 1:#x} overlaps "
                    f"{start:#x}-{end - 1:#x}, {why}; link the kernel elsewhere "
                    "(1 MiB, 0x100000, is the usual place)")
    ordered = sorted((s for s in segments if s.size), key=lambda s: s.address)
    for a, b in zip(ordered, ordered[1:], strict=False):
        if b.address < a.end:
            raise LoaderError(f"{what}: segments {a.address:#x}-{a.end - 1:#x} and "
                              f"{b.address:#x}-{b.end - 1:#x} overlap")


def write_segments(memory, segments: List[Segment]) -> None:
    for seg in segments:
        if seg.data:
            memory.write(seg.address, seg.data)
        if seg.size > len(seg.data):
            memory.write(seg.address + len(seg.data), bytes(seg.size - len(seg.data)))


def as_bytes(data, what: str) -> bytes:
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    raise LoaderError(f"{what} must be bytes (read the file first), not {type(data).__name__}")
