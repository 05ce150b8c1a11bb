"""What the loaders share: the image description, errors, placement checks,
reading an image file, and the strings handed to the guest."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from typing import List, Optional, Tuple, Union

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


_READ_CHUNK = 1 << 20


def read_image_file(path: Union[str, os.PathLike], what: str, limit: int) -> bytes:
    """The contents of the file at ``path`` (``what`` names it in errors),
    which must fit in ``limit`` bytes of guest RAM.

    The size is checked before the contents are read: a regular file's by
    its length, anything else (a pipe, ``/dev/zero``) by reading at most
    ``limit + 1`` bytes, so no input makes pyvt read more than it can load.
    Raises :class:`LoaderError` if the file cannot be read or is too large.
    """
    path = os.fspath(path)

    def too_large(size: str) -> LoaderError:
        return LoaderError(f"{what} {path}{size} is larger than the {max(limit, 0):#x} bytes "
                           "of guest RAM it has to fit in: give the VM more memory (--memory)")

    try:
        with open(path, "rb") as f:
            info = os.fstat(f.fileno())
            regular = stat.S_ISREG(info.st_mode)
            if regular and info.st_size > limit:
                raise too_large(f" ({info.st_size} bytes)")
            chunks: List[bytes] = []
            got = 0
            while got <= limit:
                # A regular file in one read; a file growing meanwhile, a pipe
                # or a device in chunks, never beyond the limit.
                want = info.st_size + 1 if regular and not chunks else _READ_CHUNK
                chunk = f.read(min(want, limit + 1 - got))
                if not chunk:
                    break
                chunks.append(chunk)
                got += len(chunk)
    except OSError as e:
        raise LoaderError(f"cannot read {what} {path}: {e.strerror or e}") from None
    if got > limit:
        raise too_large("")
    return b"".join(chunks)


#: A command line or module string: str or bytes (see :func:`guest_string`).
GuestString = Union[str, bytes]


def guest_string(value: GuestString, what: str) -> bytes:
    """A command line or module string as the bytes the guest gets (without
    the terminating NUL): bytes as they are; a str encoded as
    :func:`os.fsencode` does, so the undecodable bytes of a command-line
    argument or a file name (PEP 383 surrogate escapes) reach the guest
    unchanged.  Raises :class:`LoaderError` for other types, for a str that
    cannot be encoded, and for a NUL inside (the guest would stop there)."""
    if isinstance(value, (bytes, bytearray)):
        raw = bytes(value)
    elif isinstance(value, str):
        try:
            raw = os.fsencode(value)
        except UnicodeEncodeError as e:
            raise LoaderError(f"{what} {value!r} cannot be encoded ({e.reason} at "
                              f"{e.start}): pass it as bytes") from None
    else:
        raise LoaderError(f"{what} must be a str or bytes, not {type(value).__name__}")
    if b"\0" in raw:
        raise LoaderError(f"{what} {value!r} contains a NUL byte, where the guest would "
                          "see it end")
    return raw
