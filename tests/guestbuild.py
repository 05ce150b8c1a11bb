"""Builds the guest programs in tests/guests/ with the system toolchain.

A guest is a flat binary linked to run at ``LOAD_ADDRESS``.  The assembler
mode follows the source's first ``.code16``/``.code32``/``.code64``
directive (none: 64-bit).  Builds are cached per session by content.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

GUEST_DIR = Path(__file__).parent / "guests"
LOAD_ADDRESS = 0x1000


class ToolchainMissing(RuntimeError):
    pass


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise ToolchainMissing(f"{name} not found: install binutils (apt-get install binutils)")
    return path


def bits_of(source: str) -> int:
    m = re.search(r"^\s*\.code(16|32|64)\b", source, re.MULTILINE)
    return int(m.group(1)) if m else 64


def build(name: str, out_dir: Path, load_address: int = LOAD_ADDRESS) -> bytes:
    """Assembles and links tests/guests/<name>.S; returns the flat image."""
    source_path = GUEST_DIR / f"{name}.S"
    source = source_path.read_text()
    key = hashlib.sha256(f"{source}{load_address}".encode()).hexdigest()[:16]
    image = out_dir / f"{name}-{key}.bin"
    if image.exists():
        return image.read_bytes()
    bits = bits_of(source)
    as_flag, ld_emulation = ("--64", "elf_x86_64") if bits == 64 else ("--32", "elf_i386")
    obj = out_dir / f"{name}-{key}.o"
    elf = out_dir / f"{name}-{key}.elf"
    subprocess.run([_tool("as"), as_flag, "-o", str(obj), str(source_path)],
                   check=True, capture_output=True, text=True)
    subprocess.run([_tool("ld"), "-m", ld_emulation, "-Ttext", hex(load_address),
                    "-e", "_start", "-o", str(elf), str(obj)],
                   check=True, capture_output=True, text=True)
    tmp = out_dir / f"{name}-{key}.{os.getpid()}.tmp"
    subprocess.run([_tool("objcopy"), "-O", "binary", "-j", ".text", "-j", ".data",
                    str(elf), str(tmp)], check=True, capture_output=True, text=True)
    tmp.replace(image)
    return image.read_bytes()
