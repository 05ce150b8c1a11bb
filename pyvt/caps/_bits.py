"""Small helpers shared by the register decoders.

Every decoder in :mod:`pyvt.caps` is a pure function from raw integers to
plain dicts and lists, so its output can go straight into the JSON report.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping


def bit(value: int, n: int) -> bool:
    """Return bit *n* of *value* as a bool."""
    return bool((value >> n) & 1)


def field(value: int, low: int, high: int) -> int:
    """Return bits *high*..*low* (inclusive, SDM notation ``high:low``)."""
    return (value >> low) & ((1 << (high - low + 1)) - 1)


def flags(value: int, names: Mapping[int, str]) -> list[str]:
    """Names of the set bits of *value* that have a name in *names*, in bit order."""
    return [names[n] for n in sorted(names) if bit(value, n)]


def unknown_bits(value: int, names: Mapping[int, str], width: int = 32) -> list[int]:
    """Set bits of *value* below *width* that *names* does not know.

    Reported so a newer CPU's bits are visible as numbers rather than lost.
    """
    return [n for n in range(width) if bit(value, n) and n not in names]


def hex32(value: int) -> str:
    return f"0x{value & 0xFFFFFFFF:08x}"


def hex64(value: int) -> str:
    return f"0x{value & 0xFFFFFFFFFFFFFFFF:016x}"


def regs_to_bytes(*regs: int) -> bytes:
    """Concatenate 32-bit registers little-endian (how CPUID spells strings)."""
    return b"".join((r & 0xFFFFFFFF).to_bytes(4, "little") for r in regs)


def ascii_string(*regs: int) -> str:
    """Decode registers holding an ASCII string (vendor, brand, signature)."""
    raw = regs_to_bytes(*regs).split(b"\0", 1)[0]
    return raw.decode("ascii", errors="replace").strip()


def snake(name: str) -> str:
    """Turn an SDM control name into the snake_case key used for ``--require``.

    ``"Enable EPT"`` -> ``"enable_ept"``, ``"CR3-load exiting"`` -> ``"cr3_load_exiting"``.
    """
    out = []
    for ch in name.lower():
        out.append(ch if ch.isalnum() else "_")
    s = "".join(out)
    while "__" in s:
        s = s.replace("__", "_")
    return s.strip("_")


def all_named(tables: Iterable[Mapping[int, str]]) -> set[str]:
    return {n for t in tables for n in t.values()}
