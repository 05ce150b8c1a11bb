"""Register access: live views that read and write a vCPU's registers, and
immutable snapshots for exits and results.

``cpu.regs.rip = 0x1000`` writes through to the vCPU; ``cpu.regs.rax`` reads
from it.  Field names are those of ``struct kvm_regs``, ``kvm_sregs``,
``kvm_segment``, ``kvm_dtable`` and ``kvm_fpu`` (from the kernel headers via
cffi, never listed by hand).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable

from ._kvm import ffi
from .errors import ArgumentError



def _field_bits(ctype: str) -> dict:
    """{field: width in bits} of a kernel struct, padding left out.  Array
    fields (FPU and XMM registers) are marked with width 0: they are read and
    written as bytes."""
    return {name: 0 if f.type.kind == "array" else 8 * ffi.sizeof(f.type)
            for name, f in ffi.typeof(ctype).fields if not name.startswith("pad")}


GENERAL_FIELDS = _field_bits("struct kvm_regs")
SEGMENT_FIELDS = _field_bits("struct kvm_segment")
DTABLE_FIELDS = _field_bits("struct kvm_dtable")
GENERAL_REGISTERS = tuple(GENERAL_FIELDS)


def _check_int(name: str, value, bits: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ArgumentError(f"register {name} must be an int, not {value!r}")
    if value < 0:
        value &= (1 << bits) - 1  # -1 means all ones, as in C
    if value >> bits:
        raise ArgumentError(f"{value:#x} does not fit in the {bits}-bit field {name}")
    return value


def _nothing() -> None:
    pass


class _View:
    """Attribute access over a cffi struct obtained from ``load`` and written
    back with ``store``; ``before_write`` runs before a write loads the
    struct (the vCPU settles a pending I/O there)."""

    __slots__ = ("_load", "_store", "_names", "_before_write")

    def __init__(self, load: Callable, store: Callable, names: dict,
                 before_write: Callable[[], None] = _nothing):
        object.__setattr__(self, "_load", load)
        object.__setattr__(self, "_store", store)
        object.__setattr__(self, "_names", names)  # {field: bits}
        object.__setattr__(self, "_before_write", before_write)

    def __getattr__(self, name: str):
        if name in self._names:
            value = getattr(self._load(), name)
            return bytes(ffi.buffer(value)) if self._names[name] == 0 else value
        raise AttributeError(f"{type(self).__name__} has no field {name!r}; "
                             f"fields: {', '.join(self._names)}")

    def __setattr__(self, name: str, value) -> None:
        if name not in self._names:
            raise AttributeError(f"{type(self).__name__} has no field {name!r}; "
                                 f"fields: {', '.join(self._names)}")
        self._before_write()
        struct = self._load()
        if self._names[name] == 0:
            target = ffi.buffer(getattr(struct, name))
            if not isinstance(value, (bytes, bytearray)) or len(value) != len(target):
                raise ArgumentError(f"{name} takes exactly {len(target)} bytes")
            target[:] = value
        else:
            setattr(struct, name, _check_int(name, value, self._names[name]))
        self._store(struct)

    def __dir__(self):
        return list(self._names)

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in self._names}

    def __repr__(self) -> str:
        values = ", ".join(f"{k}={v:#x}" for k, v in self.as_dict().items()
                           if isinstance(v, int))
        return f"{type(self).__name__}({values})"


class RegisterView(_View):
    """General registers (``struct kvm_regs``) of a vCPU, read/write through."""

    __slots__ = ()

    def snapshot(self) -> "Registers":
        return Registers.from_struct(self._load())


class FpuView(_View):
    """FPU/SSE state (``struct kvm_fpu``): ``fcw``, ``mxcsr``... as ints,
    ``fpr`` and ``xmm`` as bytes."""

    __slots__ = ()


FPU_FIELDS = _field_bits("struct kvm_fpu")


class SegmentView(_View):
    """One segment register of ``struct kvm_sregs``."""

    __slots__ = ()


class TableView(_View):
    """GDTR or IDTR (``struct kvm_dtable``)."""

    __slots__ = ()


class SpecialRegisterView:
    """Special registers (``struct kvm_sregs``): control registers, EFER,
    segments (``cpu.sregs.cs.base``), GDT/IDT."""

    SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")
    TABLES = ("gdt", "idt")
    SCALARS = ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")

    def __init__(self, load: Callable, store: Callable,
                 before_write: Callable[[], None] = _nothing):
        self._load = load
        self._store = store
        self._before_write = before_write

    def _member(self, name: str, kind, names):
        return kind(lambda: getattr(self._load(), name),
                    lambda _: self._store(self._load()), names, self._before_write)

    def __getattr__(self, name: str):
        if name in self.SEGMENTS:
            return self._member(name, SegmentView, SEGMENT_FIELDS)
        if name in self.TABLES:
            return self._member(name, TableView, DTABLE_FIELDS)
        if name in self.SCALARS:
            return getattr(self._load(), name)
        raise AttributeError(f"sregs has no field {name!r}")

    def __setattr__(self, name: str, value) -> None:
        if name.startswith("_"):
            object.__setattr__(self, name, value)
            return
        if name not in self.SCALARS:
            raise AttributeError(
                f"cannot assign sregs.{name}: assign its fields (e.g. sregs.cs.base)"
                if name in self.SEGMENTS + self.TABLES else f"sregs has no field {name!r}")
        self._before_write()
        struct = self._load()
        setattr(struct, name, _check_int(name, value, 64))
        self._store(struct)

    def __dir__(self):
        return list(self.SEGMENTS + self.TABLES + self.SCALARS)

    def __repr__(self) -> str:
        s = self._load()
        return ("SpecialRegisters(" + ", ".join(f"{n}={getattr(s, n):#x}" for n in self.SCALARS)
                + f", cs.selector={s.cs.selector:#x}, cs.l={s.cs.l})")


@dataclass(frozen=True)
class Registers:
    """An immutable copy of the general registers at one moment."""

    rax: int = 0
    rbx: int = 0
    rcx: int = 0
    rdx: int = 0
    rsi: int = 0
    rdi: int = 0
    rsp: int = 0
    rbp: int = 0
    r8: int = 0
    r9: int = 0
    r10: int = 0
    r11: int = 0
    r12: int = 0
    r13: int = 0
    r14: int = 0
    r15: int = 0
    rip: int = 0
    rflags: int = 0

    @classmethod
    def from_struct(cls, struct) -> "Registers":
        return cls(**{f.name: getattr(struct, f.name) for f in fields(cls)})

    def dump(self) -> str:
        """Four registers a line, the way a crash dump prints them."""
        names = [f.name for f in fields(self)]
        lines = []
        for i in range(0, len(names), 4):
            lines.append("  ".join(f"{n.upper():>6}={getattr(self, n):016x}"
                                   for n in names[i:i + 4]))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return "Registers(" + ", ".join(
            f"{f.name}={getattr(self, f.name):#x}" for f in fields(self)) + ")"


assert set(f.name for f in fields(Registers)) == set(GENERAL_REGISTERS), \
    "Registers must list exactly the fields of struct kvm_regs"
