"""The function symbols of an ELF64 executable (its ``.symtab``), for
:class:`pyvt.Sandbox`, which calls guest functions by name.

A small reader of the section headers and the symbol table, beside
:mod:`pyvt.loaders.elf` (which reads the program headers): no dependency,
and the same validating style.  Only what calling needs is kept: each
global or weak ``STT_FUNC`` symbol that is defined, with its address and
size.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Dict

from .common import LoaderError, as_bytes

SHT_SYMTAB = 2
STT_FUNC = 2
STB_GLOBAL = 1
STB_WEAK = 2
SHN_UNDEF = 0
PT_LOAD = 1

_SECTION = struct.Struct("<IIQQQQIIQQ")  # Elf64_Shdr
_SYMBOL = struct.Struct("<IBBHQQ")  # Elf64_Sym
_PROGRAM = struct.Struct("<IIQQQQQQ")  # Elf64_Phdr


@dataclass(frozen=True)
class FunctionSymbol:
    name: str
    address: int
    size: int

    def __contains__(self, address: int) -> bool:
        return self.address <= address < self.address + max(self.size, 1)


def _slice(data: bytes, offset: int, size: int, what: str, part: str) -> bytes:
    if offset < 0 or size < 0 or offset + size > len(data):
        raise LoaderError(f"{what}: its {part} runs past the end of the file (truncated?)")
    return data[offset:offset + size]


def _c_string(table: bytes, offset: int) -> str:
    end = table.find(b"\0", offset)
    return table[offset:end if end >= 0 else len(table)].decode("utf-8", "replace")


def function_symbols(data: bytes, what: str = "guest") -> Dict[str, FunctionSymbol]:
    """``{name: FunctionSymbol}`` of the global function symbols defined in
    the ELF64 file ``data``; raises :class:`LoaderError` for a file without
    a symbol table (stripped) or a malformed one."""
    data = as_bytes(data, what)
    if data[:4] != b"\x7fELF" or len(data) < 64 or data[4] != 2:
        raise LoaderError(f"{what} is not an ELF64 file")
    e_shoff, = struct.unpack_from("<Q", data, 0x28)
    e_shentsize, e_shnum = struct.unpack_from("<HH", data, 0x3A)
    if e_shnum == 0 or e_shentsize < _SECTION.size:
        raise LoaderError(f"{what} has no section headers, so no symbol table: link it "
                          "without -s and do not strip it")
    sections = [_SECTION.unpack(_slice(data, e_shoff + i * e_shentsize, _SECTION.size,
                                       what, "section headers"))
                for i in range(e_shnum)]
    symtab = next((s for s in sections if s[1] == SHT_SYMTAB), None)
    if symtab is None:
        raise LoaderError(f"{what} has no symbol table (.symtab): it was stripped; "
                          "build it without -s and do not run strip on it")
    _, _, _, _, offset, size, link, _, _, entsize = symtab
    if link >= len(sections) or entsize < _SYMBOL.size:
        raise LoaderError(f"{what}: its symbol table is malformed")
    strings = _slice(data, sections[link][4], sections[link][5], what, "string table")
    table = _slice(data, offset, size, what, "symbol table")
    functions = {}
    for at in range(0, len(table) - _SYMBOL.size + 1, entsize):
        st_name, st_info, _, st_shndx, st_value, st_size = _SYMBOL.unpack_from(table, at)
        if (st_info & 0xF) != STT_FUNC or (st_info >> 4) not in (STB_GLOBAL, STB_WEAK):
            continue
        if st_shndx == SHN_UNDEF:
            continue
        name = _c_string(strings, st_name)
        functions[name] = FunctionSymbol(name, st_value, st_size)
    return functions


def check_identity_linked(data: bytes, what: str = "guest") -> None:
    """Raises :class:`LoaderError` unless every ``PT_LOAD`` segment's virtual
    address is its physical one: pyvt maps guest memory 1:1, so code runs
    where it is loaded only then."""
    e_phoff, = struct.unpack_from("<Q", data, 0x20)
    e_phentsize, e_phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(e_phnum):
        p_type, _, _, p_vaddr, p_paddr, _, _, _ = _PROGRAM.unpack(
            _slice(data, e_phoff + i * e_phentsize, _PROGRAM.size, what, "program headers"))
        if p_type == PT_LOAD and p_vaddr != p_paddr:
            raise LoaderError(f"{what}: segment {i} is linked at {p_vaddr:#x} but loaded at "
                              f"{p_paddr:#x}; pyvt maps memory 1:1, so link it with equal "
                              "virtual and physical addresses (no AT() in the linker script)")
