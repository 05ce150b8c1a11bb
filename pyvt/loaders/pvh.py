"""PVH boot: an uncompressed ELF kernel (Linux's vmlinux) whose
``XEN_ELFNOTE_PHYS32_ENTRY`` note gives a 32-bit entry point, entered as
Xen's PVH ABI (xen/include/public/arch-x86/hvm/start_info.h) says:
flat 32-bit protected mode, paging off, CR4 clear, interrupts off, a
32-bit TSS in TR, and ``ebx`` pointing at ``struct hvm_start_info``
(command line, modules (the initrd), the ACPI RSDP and the memory map).

Layout (low memory, usable RAM in the map: the kernel copies what it needs):

=========  ==========================================================
0x7000     hvm_start_info (56 bytes), then the module list (one entry:
           the initrd) at 0x7040, then the memory map at 0x7080
0x20000    the command line
=========  ==========================================================

The initrd goes at the top of RAM, page-aligned, above the kernel.
"""

from __future__ import annotations

import struct
from typing import Optional

from .. import e820
from .common import Image, LoaderError, Segment, as_bytes, check_placement, write_segments
from .elf import parse_elf

XEN_ELFNOTE_PHYS32_ENTRY = 18
HVM_START_MAGIC = 0x336EC578
HVM_START_VERSION = 1
START_INFO_ADDRESS = 0x7000
MODLIST_ADDRESS = 0x7040
MEMMAP_ADDRESS = 0x7080
CMDLINE_ADDRESS = 0x20000
#: magic, version, flags, nr_modules, modlist_paddr, cmdline_paddr,
#: rsdp_paddr, memmap_paddr, memmap_entries, reserved.
START_INFO = struct.Struct("<IIIIQQQQII")
MODLIST_ENTRY = struct.Struct("<QQQQ")  # paddr, size, cmdline_paddr, reserved
MEMMAP_ENTRY = struct.Struct("<QQII")  # addr, size, type, reserved
PAGE = 0x1000


def _notes(blob: bytes):
    """(name, type, desc) of each ELF note in ``blob``."""
    at = 0
    while at + 12 <= len(blob):
        namesz, descsz, kind = struct.unpack_from("<III", blob, at)
        name_at = at + 12
        desc_at = name_at + (namesz + 3) // 4 * 4
        end = desc_at + (descsz + 3) // 4 * 4
        if end > len(blob):
            return
        yield blob[name_at:name_at + namesz].rstrip(b"\0"), kind, blob[desc_at:desc_at + descsz]
        at = end


def find_pvh_entry(data: bytes) -> Optional[int]:
    """The PVH entry address of an ELF kernel, or None if it has no
    ``XEN_ELFNOTE_PHYS32_ENTRY`` note (or is no ELF executable)."""
    if data[:4] != b"\x7fELF":
        return None
    try:
        notes = parse_elf(data).notes
    except LoaderError:
        return None
    for blob in notes:
        for name, kind, desc in _notes(blob):
            if name == b"Xen" and kind == XEN_ELFNOTE_PHYS32_ENTRY and desc:
                return int.from_bytes(desc[:8], "little")
    return None


def start_info(cmdline_address: int, initrd: Optional[tuple], rsdp_address: int,
               ram_size: int) -> bytes:
    """hvm_start_info, its module list and memory map, as laid out from
    :data:`START_INFO_ADDRESS`; ``initrd`` is ``(address, size)`` or None."""
    entries = e820.linux_memory_map(ram_size)
    info = START_INFO.pack(HVM_START_MAGIC, HVM_START_VERSION, 0, 1 if initrd else 0,
                           MODLIST_ADDRESS if initrd else 0, cmdline_address, rsdp_address,
                           MEMMAP_ADDRESS, len(entries), 0)
    blob = bytearray(MEMMAP_ADDRESS - START_INFO_ADDRESS + len(entries) * MEMMAP_ENTRY.size)
    blob[:len(info)] = info
    if initrd:
        MODLIST_ENTRY.pack_into(blob, MODLIST_ADDRESS - START_INFO_ADDRESS, initrd[0], initrd[1],
                                0, 0)
    for i, (base, length, kind) in enumerate(entries):
        MEMMAP_ENTRY.pack_into(blob, MEMMAP_ADDRESS - START_INFO_ADDRESS + i * MEMMAP_ENTRY.size,
                               base, length, kind, 0)
    return bytes(blob)


def load_pvh(memory, data: bytes, cmdline: bytes = b"", initrd: Optional[bytes] = None,
             rsdp_address: int = 0, what: str = "kernel") -> Image:
    """Loads an ELF kernel with a PVH entry note, its command line and
    ``initrd``, and writes hvm_start_info; enter it with :func:`enter`."""
    data = as_bytes(data, what)
    entry = find_pvh_entry(data)
    if entry is None:
        raise LoaderError(f"{what} has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY): "
                          "boot it as a bzImage, or build it with CONFIG_PVH")
    elf = parse_elf(data, what)
    segments = elf.loadable()
    if not any(s.address <= entry < s.end for s in segments):
        raise LoaderError(f"{what}: its PVH entry {entry:#x} is in no loaded segment")
    e820.linux_memory_map(memory.size)  # refuses a RAM size the map cannot describe
    kernel_end = max(s.end for s in segments)
    segments.append(Segment(CMDLINE_ADDRESS, cmdline + b"\0", len(cmdline) + 1))
    initrd_at = None
    if initrd is not None:
        top = min(memory.size, 1 << 32)
        address = (top - len(initrd)) // PAGE * PAGE
        if address < (kernel_end + PAGE - 1) // PAGE * PAGE:
            raise LoaderError(f"the initrd ({len(initrd)} bytes) does not fit between the "
                              f"kernel (up to {kernel_end:#x}) and the end of RAM: give the "
                              "VM more memory (--memory)")
        initrd_at = (address, len(initrd))
        segments.append(Segment(address, bytes(initrd), len(initrd)))
    info = start_info(CMDLINE_ADDRESS, initrd_at, rsdp_address, memory.size)
    segments.append(Segment(START_INFO_ADDRESS, info, len(info)))
    check_placement(segments, memory.size, what)
    write_segments(memory, segments)
    image = Image("pvh", entry, "protected", segments, registers={"rbx": START_INFO_ADDRESS},
                  info_address=START_INFO_ADDRESS)
    if initrd_at:
        image.modules.append((initrd_at[0], initrd_at[0] + initrd_at[1]))
    return image


def enter(cpu, image: Image) -> None:
    """What PVH asks beyond pyvt's flat protected mode: CR4 clear and a
    32-bit TSS (base 0, limit 0x67) in TR."""
    sregs = cpu.fd.get_sregs()
    sregs.cr4 = 0
    sregs.tr.base = 0
    sregs.tr.limit = 0x67
    sregs.tr.type = 0xB  # 32-bit TSS, busy
    sregs.tr.present = 1
    sregs.tr.s = 0
    sregs.tr.unusable = 0
    cpu.fd.set_sregs(sregs)


__all__ = ["find_pvh_entry", "start_info", "load_pvh", "enter", "START_INFO_ADDRESS",
           "HVM_START_MAGIC", "XEN_ELFNOTE_PHYS32_ENTRY"]
