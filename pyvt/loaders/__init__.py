"""Kernel loaders: put a kernel image into guest memory and say how to enter it.

- :func:`load_flat`: raw machine code at an address;
- :func:`load_elf`: ELF32/ELF64 executables (``PT_LOAD`` segments at their
  physical addresses, bss zeroed);
- :func:`load_multiboot`: multiboot v1 kernels (ELF or the a.out kludge),
  with the boot information structure, command line, modules and memory map;
- :func:`load_bzimage`: Linux bzImages (the x86 boot protocol: zero page,
  e820 map, command line, initrd; 64-bit or 32-bit entry);
- :func:`load_pvh`: ELF kernels with a PVH entry note (Linux's vmlinux),
  given ``hvm_start_info``.

:func:`detect` tells which one an image needs.  Every loader checks that
what it writes lies in guest RAM and clear of :data:`RESERVED` (pyvt's own
areas), and raises :class:`LoaderError` saying what to change otherwise.
``Vm.boot`` (:mod:`pyvt.boot`) uses them.
"""

from __future__ import annotations

from .bzimage import is_bzimage, load_bzimage, parse_setup_header
from .common import RESERVED, Image, LoaderError, Segment
from .elf import ElfFile, load_elf, parse_elf
from .flat import load_flat
from .pvh import find_pvh_entry, load_pvh
from .multiboot import (
    MULTIBOOT_BOOTLOADER_MAGIC,
    MultibootHeader,
    find_multiboot_header,
    load_multiboot,
)


def detect(data: bytes) -> str:
    """``"bzimage"``, ``"multiboot"``, ``"pvh"`` (an ELF with a PVH entry
    note), ``"elf"`` or ``"flat"``: what ``data`` is."""
    if is_bzimage(data):
        return "bzimage"
    if find_multiboot_header(data) is not None:
        return "multiboot"
    if data[:4] == b"\x7fELF":
        return "pvh" if find_pvh_entry(data) is not None else "elf"
    return "flat"


__all__ = [
    "RESERVED", "Image", "LoaderError", "Segment", "ElfFile", "parse_elf", "load_elf",
    "load_flat", "MULTIBOOT_BOOTLOADER_MAGIC", "MultibootHeader", "find_multiboot_header",
    "load_multiboot", "detect", "is_bzimage", "load_bzimage", "parse_setup_header",
    "find_pvh_entry", "load_pvh",
]
