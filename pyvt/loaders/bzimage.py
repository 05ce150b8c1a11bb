"""Linux bzImage kernels: the x86 boot protocol (the kernel's
Documentation/arch/x86/boot.rst), entered the way a 32/64-bit boot loader
does, with no BIOS and no real-mode setup code run.

The file is a real-mode setup part (boot sector + ``setup_sects`` sectors,
with the *setup header* at 0x1f1) and the protected-mode kernel after it.
pyvt loads only the protected-mode kernel, at ``pref_address`` (relocatable
kernels; else ``code32_start``), and builds the *zero page*
(``struct boot_params``): the setup header copied from the file, then what
a boot loader fills in: ``type_of_loader`` 0xff, the command line, the
initrd, the e820 memory map (:mod:`pyvt.e820`) and the ACPI RSDP address.

Entry (``xloadflags``):

- XLF_KERNEL_64: 64-bit mode at the load address + 0x200, paging on with
  pyvt's identity map of 0-4 GiB;
- else the 32-bit entry at the load address, flat protected mode, no paging.

Either way the GDT has the flat ``__BOOT_CS`` (0x10) and ``__BOOT_DS``
(0x18) the protocol asks for, interrupts are off and ``rsi`` points at the
zero page.

Layout (low memory, usable RAM in the e820 map: Linux copies what it needs
before it allocates memory):

=========  ===================================================
0x6000     the boot GDT (null, null, __BOOT_CS, __BOOT_DS)
0x7000     boot_params (the zero page, 4 KiB)
0x20000    the command line (``cmdline_size`` + 1 bytes at most)
=========  ===================================================

The initrd goes at the top of RAM, under ``initrd_addr_max``, page-aligned
and above the kernel's ``init_size``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Optional

from .. import e820
from .common import Image, LoaderError, Segment, as_bytes, check_placement, write_segments

BOOT_FLAG = 0xAA55
HEADER_MAGIC = b"HdrS"
#: The oldest protocol pyvt boots: 2.10 (Linux 2.6.31) has ``init_size`` and
#: ``pref_address``, which placing a kernel without its setup code needs.
MIN_VERSION = 0x020A

# Offsets in the file and in boot_params (the setup header is at the same
# place in both).
SETUP_HEADER = 0x1F1
OFF_SETUP_SECTS = 0x1F1
OFF_BOOT_FLAG = 0x1FE
OFF_JUMP = 0x200
OFF_HEADER = 0x202
OFF_VERSION = 0x206
OFF_TYPE_OF_LOADER = 0x210
OFF_LOADFLAGS = 0x211
OFF_CODE32_START = 0x214
OFF_RAMDISK_IMAGE = 0x218
OFF_RAMDISK_SIZE = 0x21C
OFF_HEAP_END_PTR = 0x224
OFF_CMD_LINE_PTR = 0x228
OFF_INITRD_ADDR_MAX = 0x22C
OFF_KERNEL_ALIGNMENT = 0x230
OFF_RELOCATABLE = 0x234
OFF_XLOADFLAGS = 0x236
OFF_CMDLINE_SIZE = 0x238
OFF_PREF_ADDRESS = 0x258
OFF_INIT_SIZE = 0x260
# boot_params outside the setup header.
OFF_ACPI_RSDP_ADDR = 0x070
OFF_EXT_RAMDISK_IMAGE = 0x0C0
OFF_EXT_RAMDISK_SIZE = 0x0C4
OFF_EXT_CMD_LINE_PTR = 0x0C8
OFF_E820_ENTRIES = 0x1E8
OFF_E820_TABLE = 0x2D0
BOOT_PARAMS_SIZE = 0x1000

LOADED_HIGH = 1 << 0
CAN_USE_HEAP = 1 << 7
XLF_KERNEL_64 = 1 << 0
XLF_CAN_BE_LOADED_ABOVE_4G = 1 << 1
TYPE_OF_LOADER_UNDEFINED = 0xFF
#: 64-bit entry: the protected-mode kernel's start + 0x200.
ENTRY_64_OFFSET = 0x200

BOOT_GDT_ADDRESS = 0x6000
BOOT_PARAMS_ADDRESS = 0x7000
CMDLINE_ADDRESS = 0x20000
BOOT_CS = 0x10
BOOT_DS = 0x18
# null, null, __BOOT_CS (32- or 64-bit code), __BOOT_DS: flat 4 GiB.
_CODE32 = 0x00CF9B000000FFFF
_CODE64 = 0x00AF9B000000FFFF
_DATA = 0x00CF93000000FFFF
#: heap_end_ptr: the end of the setup heap, relative to the real-mode code
#: (as QEMU sets it; used only by the real-mode setup code pyvt skips).
HEAP_END = 0xFE00
PAGE = 0x1000


@dataclass(frozen=True)
class SetupHeader:
    """The fields of a bzImage's setup header that loading needs."""

    version: int
    setup_sects: int
    loadflags: int
    code32_start: int
    initrd_addr_max: int
    kernel_alignment: int
    relocatable: bool
    xloadflags: int
    cmdline_size: int
    pref_address: int
    init_size: int
    header_end: int  # first byte after the setup header (0x202 + the jump's offset)

    @property
    def entry_64(self) -> bool:
        return bool(self.xloadflags & XLF_KERNEL_64)

    @property
    def version_text(self) -> str:
        return f"{self.version >> 8}.{self.version & 0xFF:02d}"


def is_bzimage(data: bytes) -> bool:
    """Whether ``data`` starts like a Linux boot image (boot flag 0xAA55
    and the "HdrS" setup header)."""
    return (len(data) >= OFF_VERSION + 2 and data[OFF_HEADER:OFF_HEADER + 4] == HEADER_MAGIC
            and struct.unpack_from("<H", data, OFF_BOOT_FLAG)[0] == BOOT_FLAG)


def parse_setup_header(data: bytes, what: str = "kernel") -> SetupHeader:
    """Reads and checks a bzImage's setup header; raises LoaderError."""
    data = as_bytes(data, what)
    if not is_bzimage(data):
        raise LoaderError(f"{what} is not a Linux bzImage (no 0xAA55 boot flag and \"HdrS\" "
                          "setup header at 0x1fe/0x202)")
    version = struct.unpack_from("<H", data, OFF_VERSION)[0]
    if version < MIN_VERSION:
        raise LoaderError(
            f"{what} uses boot protocol {version >> 8}.{version & 0xFF:02d}; pyvt boots "
            "2.10 and later (Linux 2.6.31+), which say how much memory the kernel "
            "needs (init_size): use a newer kernel")
    header_end = OFF_HEADER + data[OFF_JUMP + 1]
    if header_end < OFF_INIT_SIZE + 4 or header_end > 0x300 or len(data) < header_end:
        raise LoaderError(f"{what}: its setup header ends at {header_end:#x}, before the "
                          "protocol 2.10 fields or past the setup sector (corrupt image?)")
    setup_sects = data[OFF_SETUP_SECTS] or 4
    loadflags = data[OFF_LOADFLAGS]
    if not loadflags & LOADED_HIGH:
        raise LoaderError(f"{what} is a zImage (loaded at 0x10000, not LOADED_HIGH): "
                          "pyvt boots bzImages only")
    (code32_start,) = struct.unpack_from("<I", data, OFF_CODE32_START)
    (initrd_addr_max, kernel_alignment) = struct.unpack_from("<II", data, OFF_INITRD_ADDR_MAX)
    relocatable = bool(data[OFF_RELOCATABLE])
    (xloadflags, cmdline_size) = struct.unpack_from("<HI", data, OFF_XLOADFLAGS)
    if version < 0x020C:
        xloadflags = 0  # the field is padding before 2.12
    (pref_address,) = struct.unpack_from("<Q", data, OFF_PREF_ADDRESS)
    (init_size,) = struct.unpack_from("<I", data, OFF_INIT_SIZE)
    if relocatable and (kernel_alignment == 0 or kernel_alignment & (kernel_alignment - 1)):
        raise LoaderError(f"{what}: kernel_alignment {kernel_alignment:#x} is not a power "
                          "of two (corrupt image?)")
    return SetupHeader(version, setup_sects, loadflags, code32_start, initrd_addr_max,
                       kernel_alignment, relocatable, xloadflags, cmdline_size, pref_address,
                       init_size, header_end)


def _align_up(value: int, to: int) -> int:
    return (value + to - 1) // to * to


def load_address(header: SetupHeader, kernel_size: int, ram_size: int, what: str) -> int:
    """Where the protected-mode kernel goes: ``pref_address`` for a
    relocatable kernel (aligned to ``kernel_alignment``), else
    ``code32_start``; the kernel needs ``init_size`` bytes of RAM from there."""
    if header.relocatable:
        address = _align_up(header.pref_address or header.code32_start, header.kernel_alignment)
    else:
        address = header.code32_start
    need = max(header.init_size, kernel_size)
    if address < e820.HIGH_RAM_START:
        raise LoaderError(f"{what} asks to be loaded at {address:#x}, below 1 MiB, where "
                          "pyvt's tables and the BIOS area are")
    if address + need > ram_size:
        raise LoaderError(
            f"{what} needs RAM up to {address + need:#x} (loaded at {address:#x}, init_size "
            f"{header.init_size:#x}), beyond this VM's {ram_size >> 20} MiB: give it more "
            "memory (--memory)")
    return address


def place_initrd(header: SetupHeader, size: int, kernel_end: int, ram_size: int) -> int:
    """The initrd's address: the highest page under ``initrd_addr_max`` and
    the end of RAM, above ``kernel_end`` (the kernel's ``init_size``)."""
    top = min(ram_size, header.initrd_addr_max + 1)
    address = (top - size) // PAGE * PAGE
    if address < _align_up(kernel_end, PAGE):
        raise LoaderError(
            f"the initrd ({size} bytes) does not fit between the kernel (up to "
            f"{kernel_end:#x}) and {top:#x} (the end of RAM or the kernel's initrd_addr_max "
            f"{header.initrd_addr_max:#x}): give the VM more memory (--memory)")
    return address


def boot_gdt(entry_64: bool) -> bytes:
    return struct.pack("<4Q", 0, 0, _CODE64 if entry_64 else _CODE32, _DATA)


def boot_params(data: bytes, header: SetupHeader, ram_size: int, cmdline_address: int,
                initrd: Optional[tuple], rsdp_address: int) -> bytes:
    """The zero page: the setup header from ``data`` and what a boot loader
    fills in.  ``initrd`` is ``(address, size)`` or None."""
    params = bytearray(BOOT_PARAMS_SIZE)
    params[SETUP_HEADER:header.header_end] = data[SETUP_HEADER:header.header_end]
    params[OFF_TYPE_OF_LOADER] = TYPE_OF_LOADER_UNDEFINED
    params[OFF_LOADFLAGS] |= CAN_USE_HEAP
    struct.pack_into("<H", params, OFF_HEAP_END_PTR, HEAP_END)
    struct.pack_into("<I", params, OFF_CMD_LINE_PTR, cmdline_address & 0xFFFFFFFF)
    struct.pack_into("<I", params, OFF_EXT_CMD_LINE_PTR, cmdline_address >> 32)
    image, size = initrd if initrd else (0, 0)
    struct.pack_into("<II", params, OFF_RAMDISK_IMAGE, image & 0xFFFFFFFF, size & 0xFFFFFFFF)
    struct.pack_into("<II", params, OFF_EXT_RAMDISK_IMAGE, image >> 32, size >> 32)
    struct.pack_into("<Q", params, OFF_ACPI_RSDP_ADDR, rsdp_address)
    entries = e820.linux_memory_map(ram_size)
    params[OFF_E820_ENTRIES] = len(entries)
    table = e820.encode(entries)
    params[OFF_E820_TABLE:OFF_E820_TABLE + len(table)] = table
    return bytes(params)


def load_bzimage(memory, data: bytes, cmdline: bytes = b"", initrd: Optional[bytes] = None,
                 rsdp_address: int = 0, what: str = "kernel") -> Image:
    """Loads a bzImage, its command line (bytes, without the NUL) and
    ``initrd``, and writes the zero page and boot GDT.  The Image's
    ``registers`` hold ``rsi`` (the zero page); enter it with :func:`enter`."""
    header = parse_setup_header(data, what)
    kernel = data[(header.setup_sects + 1) * 512:]
    if not kernel:
        raise LoaderError(f"{what} is truncated: nothing after its {header.setup_sects} "
                          "setup sectors")
    if len(cmdline) > header.cmdline_size:
        raise LoaderError(f"the command line is {len(cmdline)} bytes; this kernel takes at "
                          f"most {header.cmdline_size}")
    address = load_address(header, len(kernel), memory.size, what)
    kernel_end = address + max(header.init_size, len(kernel))
    if kernel_end > e820.RAM_LIMIT:
        raise LoaderError(f"{what} would reach {kernel_end:#x}, into the PCI windows")
    e820.linux_memory_map(memory.size)  # refuses a RAM size Linux cannot be told of
    segments = [Segment(address, kernel, len(kernel)),
                Segment(CMDLINE_ADDRESS, cmdline + b"\0", len(cmdline) + 1)]
    initrd_at = None
    if initrd is not None:
        initrd_at = (place_initrd(header, len(initrd), kernel_end, memory.size), len(initrd))
        segments.append(Segment(initrd_at[0], bytes(initrd), len(initrd)))
    params = boot_params(data, header, memory.size, CMDLINE_ADDRESS, initrd_at, rsdp_address)
    gdt = boot_gdt(header.entry_64)
    segments += [Segment(BOOT_GDT_ADDRESS, gdt, len(gdt)),
                 Segment(BOOT_PARAMS_ADDRESS, params, len(params))]
    check_placement(segments, memory.size, what)
    write_segments(memory, segments)
    entry = address + ENTRY_64_OFFSET if header.entry_64 else address
    image = Image("bzimage", entry, "long" if header.entry_64 else "protected", segments,
                  registers={"rsi": BOOT_PARAMS_ADDRESS, "rbp": 0, "rdi": 0, "rbx": 0},
                  info_address=BOOT_PARAMS_ADDRESS)
    if initrd_at:
        image.modules.append((initrd_at[0], initrd_at[0] + initrd_at[1]))
    return image


def enter(cpu, image: Image) -> None:
    """Points ``cpu`` (made in ``image.mode``) at the boot GDT with
    CS = __BOOT_CS and DS = ES = SS = __BOOT_DS, as the protocol asks;
    interrupts stay off (pyvt starts with RFLAGS.IF clear)."""
    sregs = cpu.fd.get_sregs()
    sregs.gdt.base = BOOT_GDT_ADDRESS
    sregs.gdt.limit = 4 * 8 - 1
    sregs.cs.selector = BOOT_CS
    for segment in (sregs.ds, sregs.es, sregs.ss, sregs.fs, sregs.gs):
        segment.selector = BOOT_DS
    cpu.fd.set_sregs(sregs)


__all__ = ["SetupHeader", "is_bzimage", "parse_setup_header", "load_address", "place_initrd",
           "boot_params", "boot_gdt", "load_bzimage", "enter", "BOOT_PARAMS_ADDRESS",
           "CMDLINE_ADDRESS", "BOOT_GDT_ADDRESS", "BOOT_CS", "BOOT_DS", "MIN_VERSION",
           "SETUP_HEADER", "OFF_E820_ENTRIES", "OFF_E820_TABLE"]
