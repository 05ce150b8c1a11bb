"""A small ACPI Machine Language (AML) encoder: what pyvt's DSDT needs.

Each function returns the bytes of one AML construct (ACPI 6.5, chapter 20,
"ACPI Machine Language Specification"); nest them as ASL nests::

    scope("\\_SB", device("PCI0", name("_HID", eisa_id("PNP0A08"))))

Integers take the shortest encoding (ZeroOp, OneOp, BytePrefix...);
resource templates (:func:`resource_template`) are buffers of the small
and large resource descriptors of chapter 6.4, ending with an end tag.
"""

from __future__ import annotations

import struct
from typing import Iterable, Union

from .errors import ArgumentError

ZERO_OP, ONE_OP, ONES_OP = 0x00, 0x01, 0xFF
BYTE_PREFIX, WORD_PREFIX, DWORD_PREFIX, STRING_PREFIX, QWORD_PREFIX = 0x0A, 0x0B, 0x0C, 0x0D, 0x0E
NAME_OP, SCOPE_OP, BUFFER_OP, PACKAGE_OP, METHOD_OP, RETURN_OP = 0x08, 0x10, 0x11, 0x12, 0x14, 0xA4
EXT_OP_PREFIX, DEVICE_OP = 0x5B, 0x82
ROOT_CHAR, PARENT_CHAR = 0x5C, 0x5E
DUAL_NAME_PREFIX, MULTI_NAME_PREFIX, NULL_NAME = 0x2E, 0x2F, 0x00

Term = Union[bytes, int, str]


def pkg_length(length: int) -> bytes:
    """The PkgLength encoding of a package whose contents (after the
    PkgLength) are ``length`` bytes; the encoded value counts itself."""
    for extra in range(4):
        total = length + 1 + extra
        if extra == 0 and total < 0x40:
            return bytes([total])
        if extra and total < 1 << (4 + 8 * extra):
            out = [(extra << 6) | (total & 0xF)]
            out += [(total >> (4 + 8 * i)) & 0xFF for i in range(extra)]
            return bytes(out)
    raise ArgumentError(f"an AML package of {length} bytes is too long (PkgLength < 256 MiB)")


def _segment(seg: str) -> bytes:
    if not 1 <= len(seg) <= 4 or not (seg[0].isupper() or seg[0] == "_") or not all(
            c.isupper() or c.isdigit() or c == "_" for c in seg):
        raise ArgumentError(f"AML name segment {seg!r} must be 1-4 of A-Z, 0-9, _ "
                            "(not starting with a digit)")
    return seg.ljust(4, "_").encode()


def name_string(path: str) -> bytes:
    """A NameString: ``\\`` (root) and ``^`` (parent) prefixes, then
    segments separated by dots (``"\\_SB.PCI0"``)."""
    prefix = b""
    while path.startswith(("\\", "^")):
        prefix += bytes([ROOT_CHAR if path[0] == "\\" else PARENT_CHAR])
        path = path[1:]
    segments = [s for s in path.split(".")] if path else []
    body = b"".join(_segment(s) for s in segments)
    if not segments:
        return prefix + bytes([NULL_NAME])
    if len(segments) == 1:
        return prefix + body
    if len(segments) == 2:
        return prefix + bytes([DUAL_NAME_PREFIX]) + body
    if len(segments) > 255:
        raise ArgumentError("an AML name path has at most 255 segments")
    return prefix + bytes([MULTI_NAME_PREFIX, len(segments)]) + body


def integer(value: int) -> bytes:
    """The shortest integer encoding of ``value`` (0 to 2**64 - 1)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 64:
        raise ArgumentError(f"an AML integer is 0 to 2**64-1, not {value!r}")
    if value == 0:
        return bytes([ZERO_OP])
    if value == 1:
        return bytes([ONE_OP])
    for prefix, fmt, limit in ((BYTE_PREFIX, "<B", 1 << 8), (WORD_PREFIX, "<H", 1 << 16),
                               (DWORD_PREFIX, "<I", 1 << 32), (QWORD_PREFIX, "<Q", 1 << 64)):
        if value < limit:
            return bytes([prefix]) + struct.pack(fmt, value)
    raise AssertionError("unreachable")


def string(text: str) -> bytes:
    """A String: ASCII without NUL."""
    raw = text.encode("ascii")
    if b"\0" in raw:
        raise ArgumentError("an AML string cannot hold NUL")
    return bytes([STRING_PREFIX]) + raw + b"\0"


def eisa_id(text: str) -> bytes:
    """ASL's EISAID("PNP0A08"): three letters and four hex digits
    compressed into a 32-bit integer (byte-swapped, as ASL does)."""
    if (len(text) != 7 or not text[:3].isalpha() or not text[:3].isupper()
            or any(c not in "0123456789ABCDEF" for c in text[3:])):
        raise ArgumentError(f"an EISA ID is three capital letters and four hex digits, "
                            f"not {text!r}")
    letters = [ord(c) - 0x40 for c in text[:3]]
    value = (letters[0] << 26) | (letters[1] << 21) | (letters[2] << 16) | int(text[3:], 16)
    return integer(int.from_bytes(value.to_bytes(4, "big"), "little"))


def _term(value: Term) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return string(value)
    return integer(value)


def _with_length(opcode: bytes, body: bytes) -> bytes:
    return opcode + pkg_length(len(body)) + body


def scope(path: str, *terms: bytes) -> bytes:
    """Scope(path) { terms }."""
    return _with_length(bytes([SCOPE_OP]), name_string(path) + b"".join(terms))


def device(path: str, *terms: bytes) -> bytes:
    """Device(path) { terms }."""
    return _with_length(bytes([EXT_OP_PREFIX, DEVICE_OP]), name_string(path) + b"".join(terms))


def name(path: str, value: Term) -> bytes:
    """Name(path, value); an int or str is encoded as an integer or string."""
    return bytes([NAME_OP]) + name_string(path) + _term(value)


def method(path: str, args: int, *terms: bytes, serialized: bool = False) -> bytes:
    """Method(path, args, NotSerialized|Serialized) { terms }."""
    if not 0 <= args <= 7:
        raise ArgumentError(f"an AML method takes 0-7 arguments, not {args}")
    flags = args | (0x08 if serialized else 0)
    return _with_length(bytes([METHOD_OP]), name_string(path) + bytes([flags]) + b"".join(terms))


def return_(value: Term) -> bytes:
    """Return(value)."""
    return bytes([RETURN_OP]) + _term(value)


def package(*elements: Term) -> bytes:
    """Package() { elements } (at most 255)."""
    if len(elements) > 255:
        raise ArgumentError("a Package holds at most 255 elements (VarPackage is not needed)")
    return _with_length(bytes([PACKAGE_OP]), bytes([len(elements)])
                        + b"".join(_term(e) for e in elements))


def buffer(data: bytes) -> bytes:
    """Buffer() { data }."""
    return _with_length(bytes([BUFFER_OP]), integer(len(data)) + bytes(data))


# -- resource descriptors (ACPI 6.5, 6.4) -------------------------------------

RESOURCE_MEMORY, RESOURCE_IO, RESOURCE_BUS = 0, 1, 2
#: General flags of an address space descriptor that a bridge produces, with
#: fixed minimum and maximum, positive decode (ASL's ResourceProducer,
#: PosDecode, MinFixed, MaxFixed).
PRODUCER_FIXED = 0x0C
IO_ENTIRE_RANGE = 0x03
MEMORY_READ_WRITE, MEMORY_CACHEABLE, MEMORY_PREFETCHABLE = 0x01, 0x02, 0x06
END_TAG = 0x79


def _address_space(tag: int, fmt: str, kind: int, flags: int, minimum: int, maximum: int,
                   granularity: int = 0, translation: int = 0) -> bytes:
    if maximum < minimum:
        raise ArgumentError(f"resource range {minimum:#x}-{maximum:#x} is empty")
    fields = struct.pack("<BBB" + fmt * 5, kind, PRODUCER_FIXED, flags, granularity, minimum,
                         maximum, translation, maximum - minimum + 1)
    return struct.pack("<BH", tag, len(fields)) + fields


def word_bus_number(minimum: int, maximum: int) -> bytes:
    """WordBusNumber(ResourceProducer, MinFixed, MaxFixed, PosDecode, 0, min, max, 0, len)."""
    return _address_space(0x88, "H", RESOURCE_BUS, 0, minimum, maximum)


def word_io(minimum: int, maximum: int) -> bytes:
    """WordIO(ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange, 0, min, max, 0, len)."""
    return _address_space(0x88, "H", RESOURCE_IO, IO_ENTIRE_RANGE, minimum, maximum)


def dword_memory(minimum: int, maximum: int, flags: int = MEMORY_READ_WRITE) -> bytes:
    """DWordMemory(ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable, ReadWrite, ...)."""
    return _address_space(0x87, "I", RESOURCE_MEMORY, flags, minimum, maximum)


def qword_memory(minimum: int, maximum: int, flags: int = MEMORY_READ_WRITE) -> bytes:
    """QWordMemory(ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable, ReadWrite, ...)."""
    return _address_space(0x8A, "Q", RESOURCE_MEMORY, flags, minimum, maximum)


def io(minimum: int, maximum: int, alignment: int, length: int) -> bytes:
    """IO(Decode16, min, max, alignment, length): a small I/O port descriptor."""
    return struct.pack("<BBHHBB", 0x47, 1, minimum, maximum, alignment, length)


def memory32_fixed(base: int, length: int, writable: bool = True) -> bytes:
    """Memory32Fixed(ReadWrite|ReadOnly, base, length)."""
    return struct.pack("<BHBII", 0x86, 9, 1 if writable else 0, base, length)


def resource_template(*descriptors: bytes) -> bytes:
    """ResourceTemplate() { descriptors }: a buffer ending with an end tag
    (checksum 0: "the sum is assumed correct")."""
    return buffer(b"".join(descriptors) + bytes([END_TAG, 0]))


def concat(terms: Iterable[bytes]) -> bytes:
    return b"".join(terms)
