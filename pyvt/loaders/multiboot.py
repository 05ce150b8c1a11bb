"""Multiboot (version 1) kernels, as GRUB legacy and ``qemu -kernel`` load them.

The header is searched in the first 8 KiB (32-bit aligned).  With flag 16
the a.out-kludge address fields say what to load where; otherwise the image
must be an ELF executable (ELF32, or ELF64 whose entry is below 4 GiB).

Machine state at entry, as the specification requires: 32-bit protected
mode with flat 4 GiB code and data segments, paging off, interrupts off,
``EAX`` = 0x2BADB002, ``EBX`` = the physical address of the information
structure.  The GDTR points at pyvt's GDT (0x90000), which the kernel must
replace before it reuses that memory, as the specification warns.

Where the loader puts its own data (never where the kernel is):

- the information structure, memory map, module list, command lines and
  boot loader name: :data:`INFO_AREA` (0x10000-0x1ffff), and the kernel's
  segments must not overlap it;
- modules (``initrd`` is module 0): page-aligned, one after another, from
  the first page boundary after the kernel's end (bss included) or 1 MiB,
  whichever is higher; they must fit in RAM.

Memory map (``mmap_*``): RAM 0-0x9fbff and 1 MiB-end usable; 0x9fc00-0x9ffff
(where a PC has its EBDA) and the BIOS area 0xe0000-0xfffff (ACPI tables)
reserved.  ``mem_lower`` is 639 KiB, ``mem_upper`` the KiB from 1 MiB to
the end of RAM below 4 GiB.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from .common import (
    RESERVED,
    GuestString,
    Image,
    LoaderError,
    Segment,
    as_bytes,
    check_placement,
    guest_string,
    overlaps,
    write_segments,
)
from .elf import parse_elf

MULTIBOOT_HEADER_MAGIC = 0x1BADB002
MULTIBOOT_BOOTLOADER_MAGIC = 0x2BADB002
SEARCH_LIMIT = 8192

HEADER_PAGE_ALIGN = 1 << 0
HEADER_MEMORY_INFO = 1 << 1
HEADER_VIDEO_MODE = 1 << 2
HEADER_AOUT_KLUDGE = 1 << 16
_UNDERSTOOD = HEADER_PAGE_ALIGN | HEADER_MEMORY_INFO | HEADER_VIDEO_MODE

INFO_MEMORY = 1 << 0
INFO_CMDLINE = 1 << 2
INFO_MODS = 1 << 3
INFO_MEM_MAP = 1 << 6
INFO_BOOT_LOADER_NAME = 1 << 9

INFO_AREA = (0x10000, 0x20000)
INFO_SIZE = 120  # struct multiboot_info up to and including the framebuffer fields
BOOT_LOADER_NAME = b"pyvt"
PAGE = 0x1000

MEMORY_AVAILABLE = 1
MEMORY_RESERVED = 2
EBDA_START = 0x9FC00
BIOS_AREA = (0xE0000, 0x100000)


@dataclass(frozen=True)
class MultibootHeader:
    offset: int
    flags: int
    header_addr: int = 0
    load_addr: int = 0
    load_end_addr: int = 0
    bss_end_addr: int = 0
    entry_addr: int = 0


def find_multiboot_header(data: bytes) -> Optional[MultibootHeader]:
    """The first valid multiboot header in the first 8 KiB, or None."""
    limit = min(len(data), SEARCH_LIMIT) - 12
    magic = struct.pack("<I", MULTIBOOT_HEADER_MAGIC)
    offset = data.find(magic, 0, limit + 4)
    while 0 <= offset <= limit:
        if offset % 4 == 0:
            _, flags, checksum = struct.unpack_from("<III", data, offset)
            if (MULTIBOOT_HEADER_MAGIC + flags + checksum) & 0xFFFFFFFF == 0:
                if flags & HEADER_AOUT_KLUDGE:
                    if offset + 32 > len(data):
                        return MultibootHeader(offset, flags)  # reported by the loader
                    return MultibootHeader(offset, flags, *struct.unpack_from("<5I", data,
                                                                              offset + 12))
                return MultibootHeader(offset, flags)
        offset = data.find(magic, offset + 1, limit + 4)
    return None


def _kludge_segments(data: bytes, h: MultibootHeader, what: str) -> List[Segment]:
    if h.offset + 32 > len(data):
        raise LoaderError(f"{what}: the multiboot header sets flag 16 but the file ends "
                          "before its address fields")
    if h.header_addr < h.load_addr:
        raise LoaderError(f"{what}: multiboot header_addr {h.header_addr:#x} is below "
                          f"load_addr {h.load_addr:#x}")
    file_offset = h.offset - (h.header_addr - h.load_addr)
    if file_offset < 0:
        raise LoaderError(f"{what}: multiboot load_addr {h.load_addr:#x} would start "
                          "before the beginning of the file")
    if h.load_end_addr:
        if h.load_end_addr < h.load_addr:
            raise LoaderError(f"{what}: multiboot load_end_addr is below load_addr")
        size = h.load_end_addr - h.load_addr
        if file_offset + size > len(data):
            raise LoaderError(f"{what}: multiboot load_end_addr {h.load_end_addr:#x} asks "
                              "for more bytes than the file has")
    else:
        size = len(data) - file_offset
    memsize = size
    if h.bss_end_addr:
        if h.bss_end_addr < h.load_addr + size:
            raise LoaderError(f"{what}: multiboot bss_end_addr {h.bss_end_addr:#x} is "
                              "below the end of the loaded data")
        memsize = h.bss_end_addr - h.load_addr
    return [Segment(h.load_addr, data[file_offset:file_offset + size], memsize)]


def memory_map(ram_size: int) -> List[Tuple[int, int, int]]:
    """(base, length, type) entries describing a VM with ``ram_size`` bytes."""
    entries = [(0, min(ram_size, EBDA_START), MEMORY_AVAILABLE)]
    if ram_size > EBDA_START:
        entries.append((EBDA_START, 0xA0000 - EBDA_START, MEMORY_RESERVED))
    entries.append((BIOS_AREA[0], BIOS_AREA[1] - BIOS_AREA[0], MEMORY_RESERVED))
    if ram_size > 0x100000:
        entries.append((0x100000, ram_size - 0x100000, MEMORY_AVAILABLE))
    return entries


def _align(value: int, to: int = PAGE) -> int:
    return (value + to - 1) & ~(to - 1)


class _InfoArea:
    """Bump allocator over INFO_AREA."""

    def __init__(self):
        self.data = bytearray(INFO_AREA[1] - INFO_AREA[0])
        self.used = 0

    def put(self, blob: bytes, align: int = 8) -> int:
        start = _align(self.used, align)
        if start + len(blob) > len(self.data):
            raise LoaderError(
                f"the multiboot information (command lines, module list, memory map) "
                f"does not fit in its {len(self.data) // 1024} KiB area at "
                f"{INFO_AREA[0]:#x}: shorten the command line or the module arguments")
        self.data[start:start + len(blob)] = blob
        self.used = start + len(blob)
        return INFO_AREA[0] + start


def load_multiboot(memory, data: bytes, cmdline: GuestString = "",
                   kernel_name: GuestString = "kernel",
                   modules: Sequence[Tuple[bytes, GuestString]] = (),
                   what: str = "kernel") -> Image:
    """Loads a multiboot kernel, its modules (``(data, string)`` pairs;
    ``initrd`` first) and the information structure.  ``cmdline`` is passed
    after ``kernel_name``, as GRUB and QEMU do.  The strings are str or
    bytes (see :func:`pyvt.loaders.common.guest_string`: a file name's or an
    argument's undecodable bytes reach the guest as they were)."""
    data = as_bytes(data, what)
    header = find_multiboot_header(data)
    if header is None:
        raise LoaderError(f"{what} has no multiboot header (magic 0x1BADB002 with a valid "
                          "checksum, 4-byte aligned, in the first 8 KiB)")
    unknown = header.flags & 0xFFFF & ~_UNDERSTOOD
    if unknown:
        raise LoaderError(f"{what}'s multiboot header requires features pyvt does not "
                          f"provide (flags {unknown:#x}; known: page align, memory info, "
                          "video mode)")
    raw_cmdline = guest_string(cmdline, "cmdline")
    raw_name = guest_string(kernel_name, "kernel name")
    module_strings = [guest_string(string, f"module {index}'s string")
                      for index, (_, string) in enumerate(modules)]
    if header.flags & HEADER_AOUT_KLUDGE:
        segments = _kludge_segments(data, header, what)
        entry = header.entry_addr
    else:
        elf = parse_elf(data, what)
        segments, entry = elf.loadable(), elf.entry
    if not any(s.address <= entry < s.end for s in segments):
        raise LoaderError(f"{what}: multiboot entry {entry:#x} is in no loaded segment")
    if entry >= 1 << 32 or any(s.end > 1 << 32 for s in segments):
        raise LoaderError(f"{what}: a multiboot kernel must load and start below 4 GiB")
    reserved = RESERVED + [(INFO_AREA[0], INFO_AREA[1],
                            "the multiboot information area (pyvt.loaders.multiboot.INFO_AREA)")]
    check_placement(segments, memory.size, what, reserved)

    info = _InfoArea()
    info_addr = info.put(bytes(INFO_SIZE), 8)
    full_cmdline = raw_name + b" " + raw_cmdline if raw_cmdline else raw_name
    cmdline_addr = info.put(full_cmdline + b"\0", 1)
    name_addr = info.put(BOOT_LOADER_NAME + b"\0", 1)
    mmap = b"".join(struct.pack("<IQQI", 20, base, length, kind)
                    for base, length, kind in memory_map(memory.size))
    mmap_addr = info.put(mmap, 8)

    # Modules: page-aligned, after the kernel (and 1 MiB).
    placed: List[Tuple[int, int]] = []
    mod_list = b""
    next_addr = _align(max(max(s.end for s in segments), 0x100000))
    for index, (blob, string) in enumerate(modules):
        blob = as_bytes(blob, f"module {index}")
        start, end = next_addr, next_addr + len(blob)
        if end > memory.size:
            raise LoaderError(
                f"module {index} ({string!r}, {len(blob)} bytes) does not fit in guest RAM: "
                f"it would end at {end:#x} but RAM ends at {memory.size:#x}; give the VM "
                "more memory (--memory)")
        for r_start, r_end, why in reserved:
            if overlaps(start, end, r_start, r_end):
                raise LoaderError(f"module {index} would overlap {why}")
        placed.append((start, end))
        string_addr = info.put(module_strings[index] + b"\0", 1)
        mod_list += struct.pack("<IIII", start, end, string_addr, 0)
        next_addr = _align(end)
    mods_addr = info.put(mod_list, 16) if mod_list else 0

    flags = INFO_MEMORY | INFO_CMDLINE | INFO_MODS | INFO_MEM_MAP | INFO_BOOT_LOADER_NAME
    low = min(memory.size, EBDA_START) >> 10
    high = (max(min(memory.size, 1 << 32) - 0x100000, 0)) >> 10
    struct.pack_into("<III", info.data, 0, flags, low, high)
    struct.pack_into("<I", info.data, 16, cmdline_addr)
    struct.pack_into("<II", info.data, 20, len(placed), mods_addr)
    struct.pack_into("<II", info.data, 44, len(mmap), mmap_addr)
    struct.pack_into("<I", info.data, 64, name_addr)

    write_segments(memory, segments)
    memory.write(INFO_AREA[0], bytes(info.data[:info.used]))
    for (start, _), (blob, _) in zip(placed, modules, strict=True):
        memory.write(start, bytes(blob))
    return Image("multiboot", entry, "protected", segments,
                 {"rax": MULTIBOOT_BOOTLOADER_MAGIC, "rbx": info_addr}, info_addr, placed)

