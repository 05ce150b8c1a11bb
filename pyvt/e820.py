"""The guest-physical memory map a Linux guest gets (the BIOS e820 table,
which the boot protocol hands over in ``boot_params``).

pyvt's guest RAM is one block from guest-physical 0.  Linux must not use:

- pyvt's setup area (:data:`pyvt.modes.SETUP_AREA_START`-``END``, the GDT
  and the identity page tables a 64-bit entry runs on until the kernel
  builds its own; the decompressor's 5-level trampoline goes below it);
- the EBDA/VGA/BIOS hole up to 1 MiB (the ACPI tables live at 0xe0000);
- the PCI configuration window (ECAM), the IOAPIC and the LAPIC.

Everything else up to the end of RAM is usable.  RAM may not reach the PCI
windows (:data:`pyvt.pci.ECAM_BASE` and above): pyvt has no RAM above 4 GiB to
move it to, so :func:`linux_memory_map` refuses it.
"""

from __future__ import annotations

import struct
from typing import List, Tuple

from . import acpi, modes, pci
from .loaders.common import LoaderError

E820_RAM = 1
E820_RESERVED = 2

#: RAM may end no higher than this (the PCI windows start there).
RAM_LIMIT = pci.ECAM_BASE
LOW_RAM_END = modes.SETUP_AREA_START
HIGH_RAM_START = 0x100000
#: One entry is 20 bytes: base (u64), length (u64), type (u32).
ENTRY = struct.Struct("<QQI")
MAX_ENTRIES = 128  # boot_params.e820_table

Entry = Tuple[int, int, int]


def linux_memory_map(ram_size: int) -> List[Entry]:
    """``(base, length, type)`` entries, sorted, for a VM with ``ram_size``
    bytes of RAM at 0.  Raises :class:`pyvt.loaders.LoaderError` if RAM is below
    2 MiB or reaches the PCI windows."""
    if ram_size < 2 << 20:
        raise LoaderError(f"Linux needs RAM above 1 MiB: this VM has {ram_size:#x} bytes; "
                             "give it more memory (--memory)")
    if ram_size > RAM_LIMIT:
        raise LoaderError(
            f"guest RAM ends at {ram_size:#x}, above {RAM_LIMIT:#x} where the PCI windows "
            f"(ECAM, BARs, IOAPIC, LAPIC) start; pyvt has no RAM above 4 GiB to move the "
            f"rest to: give the VM at most {RAM_LIMIT >> 20} MiB (--memory {RAM_LIMIT >> 20}M)")
    return [
        (0, LOW_RAM_END, E820_RAM),
        # pyvt's GDT and page tables, then the EBDA, VGA and BIOS areas.
        (LOW_RAM_END, HIGH_RAM_START - LOW_RAM_END, E820_RESERVED),
        (HIGH_RAM_START, ram_size - HIGH_RAM_START, E820_RAM),
        (pci.ECAM_BASE, pci.ECAM_SIZE, E820_RESERVED),  # as the MCFG table says
        (acpi.IOAPIC_ADDRESS, 0x1000, E820_RESERVED),
        (acpi.LAPIC_ADDRESS, 0x1000, E820_RESERVED),
    ]


def encode(entries: List[Entry]) -> bytes:
    """The entries as boot_params.e820_table holds them."""
    if len(entries) > MAX_ENTRIES:
        raise LoaderError(f"{len(entries)} e820 entries; boot_params holds {MAX_ENTRIES}")
    return b"".join(ENTRY.pack(*e) for e in entries)


def decode(data: bytes, count: int) -> List[Entry]:
    """The first ``count`` entries of an e820 table."""
    return [ENTRY.unpack_from(data, i * ENTRY.size) for i in range(count)]


__all__ = ["E820_RAM", "E820_RESERVED", "RAM_LIMIT", "linux_memory_map", "encode",
           "decode"]
