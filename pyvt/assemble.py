"""Assembling guest code with the system toolchain (GNU ``as``/``ld``).

``assemble(source)`` turns AT&T-syntax assembly into a flat binary linked to
run at ``at``; the mode follows the source's first ``.code16``/``.code32``/
``.code64`` directive (none: 64-bit).  pyvt's tests and benchmarks build
their guests with it; it needs binutils (``apt-get install binutils``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from typing import Optional

from .errors import ArgumentError, ArgumentTypeError, Error
from .modes import LOAD_ADDRESS as DEFAULT_ADDRESS

#: The longest file name Linux file systems take (bytes).
_NAME_MAX = 255


class AssemblerError(Error):
    """The toolchain is missing or rejected the source."""


def source_bits(source: str) -> int:
    """16, 32 or 64: the first ``.codeNN`` directive, else 64."""
    m = re.search(r"^\s*\.code(16|32|64)\b", source, re.MULTILINE)
    return int(m.group(1)) if m else 64


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise AssemblerError(f"{name} not found: install binutils (apt-get install binutils)")
    return path


def _step(argv, what: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, errors="replace")
    if done.returncode:
        raise AssemblerError(f"{what} failed:\n{done.stderr.strip()}")


def _check_name(name) -> None:
    """``name`` names the temporary files: a plain file-name stem, so that
    they stay in pyvt's temporary directory."""
    if not isinstance(name, str):
        raise ArgumentTypeError(f"name must be a str, not {name!r}")
    if name in ("", ".", "..") or "/" in name or "\0" in name:
        raise ArgumentError(f"name must be a plain file-name stem (no path separators), "
                            f"not {name!r}")
    try:
        encoded = os.fsencode(name)
    except UnicodeEncodeError:
        raise ArgumentError(f"name {name!r} cannot be a file name on this system") from None
    if len(encoded) > _NAME_MAX - len(".elf"):
        raise ArgumentError(f"name is {len(encoded)} bytes long; at most "
                            f"{_NAME_MAX - len('.elf')} make a file name")


def assemble(source: str, at: int = DEFAULT_ADDRESS, bits: Optional[int] = None,
             name: str = "guest") -> bytes:
    """Assembles ``source``; returns the flat image of its .text and .data,
    linked at ``at`` (entry symbol ``_start`` if defined).  ``name`` (a plain
    file-name stem) names the build's files in error messages."""
    if not isinstance(source, str):
        raise ArgumentTypeError(f"source must be a str of assembly, not {type(source).__name__}")
    if isinstance(at, bool) or not isinstance(at, int):
        raise ArgumentTypeError(f"at must be an int address, not {at!r}")
    if not 0 <= at < 1 << 64:
        raise ArgumentError(f"at must be an address in [0, 2**64), not {at:#x}")
    _check_name(name)
    bits = bits or source_bits(source)
    if bits not in (16, 32, 64):
        raise AssemblerError(f"bits must be 16, 32 or 64, not {bits}")
    as_flag, emulation = ("--64", "elf_x86_64") if bits == 64 else ("--32", "elf_i386")
    with tempfile.TemporaryDirectory(prefix="pyvt-asm-") as tmp:
        src = os.path.join(tmp, f"{name}.S")
        obj, elf, flat = (os.path.join(tmp, f"{name}.{ext}") for ext in ("o", "elf", "bin"))
        # surrogateescape: bytes that are not UTF-8 (assemble_file) go back as they were.
        with open(src, "w", encoding="utf-8", errors="surrogateescape") as f:
            f.write(source if source.endswith("\n") else source + "\n")
        _step([_tool("as"), as_flag, "-o", obj, src], f"assembling {name}")
        _step([_tool("ld"), "-m", emulation, "-Ttext", hex(at), "-e", "_start",
               "-o", elf, obj], f"linking {name}")
        _step([_tool("objcopy"), "-O", "binary", "-j", ".text", "-j", ".data", elf, flat],
              f"extracting {name}")
        with open(flat, "rb") as f:
            return f.read()


def assemble_file(path, at: int = DEFAULT_ADDRESS) -> bytes:
    """Assembles the file at ``path`` (see :func:`assemble`)."""
    if not isinstance(path, (str, bytes, os.PathLike)):
        raise ArgumentTypeError(f"path must be a file path, not {path!r}")
    path = os.fsdecode(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise AssemblerError(f"cannot read {path}: {e.strerror}") from None
    return assemble_source_bytes(raw, path, at)


def assemble_source_bytes(raw: bytes, path: str, at: int = DEFAULT_ADDRESS) -> bytes:
    """Assembles the contents ``raw`` of the source file ``path``.  The
    assembler reads bytes, so bytes that are not UTF-8 (a Latin-1 string
    in ``.ascii``) reach the guest as they are in the file."""
    source = raw.decode("utf-8", "surrogateescape")
    return assemble(source, at=at, name=os.path.splitext(os.path.basename(path))[0])
