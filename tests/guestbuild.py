"""Builds the guest programs in tests/guests/ (with pyvt.assemble), cached
per test session by content."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyvt
from pyvt.assemble import AssemblerError, assemble

GUEST_DIR = Path(__file__).parent / "guests"
LOAD_ADDRESS = pyvt.LOAD_ADDRESS

__all__ = ["AssemblerError", "GUEST_DIR", "LOAD_ADDRESS", "build"]


def build(name: str, out_dir: Path, load_address: int = LOAD_ADDRESS) -> bytes:
    """The flat image of tests/guests/<name>.S linked at ``load_address``."""
    source = (GUEST_DIR / f"{name}.S").read_text()
    key = hashlib.sha256(f"{source}{load_address}".encode()).hexdigest()[:16]
    image = out_dir / f"{name}-{key}.bin"
    if not image.exists():
        image.write_bytes(assemble(source, at=load_address, name=name))
    return image.read_bytes()
