"""ELF32 and ELF64 executables for x86 (a small, validating header reader).

Only what loading needs is read: the ELF header and the program headers.
``PT_LOAD`` segments go to their *physical* address (``p_paddr``), as
QEMU's and GRUB's loaders do, with ``p_memsz - p_filesz`` zeroed (bss).

A kernel linked the usual way (``ld -Ttext=0x100000``) has a first
``PT_LOAD`` segment at 0xff000 that holds only the ELF and program headers:
it lies in the PC's 0xa0000-0xfffff hole, where pyvt keeps the ACPI tables.
Like QEMU, pyvt does not load such *header-only* segments there
(:meth:`ElfFile.loadable`); a segment with code or data in the hole is
still refused.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import List, Optional, Tuple

from .common import (RESERVED, Image, LoaderError, Segment, as_bytes, check_placement,
                     overlaps, write_segments)

EM_386 = 3
EM_X86_64 = 62
ET_EXEC = 2
PT_LOAD = 1
PT_DYNAMIC = 2
PT_INTERP = 3
PT_NOTE = 4


@dataclass(frozen=True)
class ElfFile:
    bits: int            # 32 or 64
    machine: int
    entry: int
    segments: List[Segment]
    #: The ``PT_LOAD`` segments (also in ``segments``) that hold nothing but
    #: the file's ELF and program headers (and zero padding).
    header_segments: Tuple[Segment, ...] = ()
    #: The ``PT_NOTE`` segments' contents (ELF notes, e.g. the PVH entry).
    notes: Tuple[bytes, ...] = ()

    def loadable(self, reserved: Optional[List[Tuple[int, int, str]]] = None) -> List[Segment]:
        """The segments to load: all but the header-only ones that overlap
        a ``reserved`` range (default :data:`pyvt.loaders.RESERVED`), which
        the kernel does not need there."""
        reserved = RESERVED if reserved is None else reserved
        return [s for s in self.segments
                if not (s in self.header_segments
                        and any(overlaps(s.address, s.end, start, end)
                                for start, end, _ in reserved))]


def parse_elf(data: bytes, what: str = "kernel") -> ElfFile:
    """Reads and checks an x86 ELF executable; raises LoaderError."""
    data = as_bytes(data, what)
    if data[:4] != b"\x7fELF":
        raise LoaderError(f"{what} is not an ELF file (no \\x7fELF magic)")
    if len(data) < 52:
        raise LoaderError(f"{what} is truncated: {len(data)} bytes is shorter than an ELF header")
    ei_class, ei_data, ei_version = data[4], data[5], data[6]
    if ei_class not in (1, 2):
        raise LoaderError(f"{what}: unknown ELF class {ei_class} (1 = 32-bit, 2 = 64-bit)")
    if ei_data != 1:
        raise LoaderError(f"{what} is big-endian; x86 kernels are little-endian")
    if ei_version != 1:
        raise LoaderError(f"{what}: unknown ELF version {ei_version}")
    bits = 32 if ei_class == 1 else 64
    if bits == 32:
        (e_type, e_machine, _, e_entry, e_phoff, _, _, _, e_phentsize,
         e_phnum) = struct.unpack_from("<HHIIIIIHHH", data, 16)
        ph_format, ph_size = "<IIIIIIII", 32
    else:
        if len(data) < 64:
            raise LoaderError(f"{what} is truncated: shorter than an ELF64 header")
        (e_type, e_machine, _, e_entry, e_phoff, _, _, _, e_phentsize,
         e_phnum) = struct.unpack_from("<HHIQQQIHHH", data, 16)
        ph_format, ph_size = "<IIQQQQQQ", 56
    if e_machine not in (EM_386, EM_X86_64):
        raise LoaderError(f"{what} is for ELF machine {e_machine}, not x86 (3) or x86-64 (62)")
    if e_type != ET_EXEC:
        kind = {1: "a relocatable object (.o)", 3: "position-independent (ET_DYN)",
                4: "a core dump"}.get(e_type, f"of type {e_type}")
        raise LoaderError(f"{what} is {kind}, not an executable: link it with a fixed "
                          "address (ld -static, no -pie)")
    if e_phnum == 0:
        raise LoaderError(f"{what} has no program headers: nothing to load")
    if e_phentsize < ph_size:
        raise LoaderError(f"{what}: program header size {e_phentsize} is too small")
    if e_phoff + e_phnum * e_phentsize > len(data):
        raise LoaderError(f"{what}: its program headers run past the end of the file")
    headers_end = max(64 if bits == 64 else 52, e_phoff + e_phnum * e_phentsize)
    segments, header_segments, notes = [], [], []
    for i in range(e_phnum):
        offset = e_phoff + i * e_phentsize
        if bits == 32:
            p_type, p_offset, _, p_paddr, p_filesz, p_memsz, _, _ = struct.unpack_from(
                ph_format, data, offset)
        else:
            p_type, _, p_offset, _, p_paddr, p_filesz, p_memsz, _ = struct.unpack_from(
                ph_format, data, offset)
        if p_type in (PT_DYNAMIC, PT_INTERP):
            raise LoaderError(f"{what} is dynamically linked; link it -static")
        if p_type == PT_NOTE:
            notes.append(data[p_offset:p_offset + p_filesz])  # clipped at the file's end
        if p_type != PT_LOAD:
            continue
        if p_filesz > p_memsz:
            raise LoaderError(f"{what}: segment {i} has p_filesz {p_filesz:#x} > "
                              f"p_memsz {p_memsz:#x}")
        if p_offset + p_filesz > len(data):
            raise LoaderError(f"{what}: segment {i} runs past the end of the file "
                              "(truncated?)")
        segment = Segment(p_paddr, data[p_offset:p_offset + p_filesz], p_memsz)
        segments.append(segment)
        if (p_offset == 0 and p_filesz == p_memsz
                and not any(data[headers_end:p_filesz])):
            header_segments.append(segment)
    if not any(s.size for s in segments):
        raise LoaderError(f"{what} has no PT_LOAD segment with contents")
    return ElfFile(bits, e_machine, e_entry, segments, tuple(header_segments), tuple(notes))


def load_elf(memory, data: bytes, what: str = "kernel") -> Image:
    """Loads an ELF executable; ELF32 is entered in 32-bit protected mode,
    ELF64 in long mode (pyvt's identity-mapped 4 GiB), at ``e_entry``."""
    elf = parse_elf(data, what)
    if not any(s.address <= elf.entry < s.end for s in elf.segments):
        raise LoaderError(f"{what}: entry point {elf.entry:#x} is in no loaded segment")
    if elf.entry >= 1 << 32:
        raise LoaderError(f"{what}: entry point {elf.entry:#x} is above 4 GiB, beyond "
                          "pyvt's identity map: link the kernel at its physical address")
    segments = elf.loadable()
    check_placement(segments, memory.size, what)
    write_segments(memory, segments)
    return Image(f"elf{elf.bits}", elf.entry, "protected" if elf.bits == 32 else "long",
                 segments)
