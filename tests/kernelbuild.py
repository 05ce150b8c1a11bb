"""Builds the multiboot test kernels in tests/guests/kernels/ with the system
gcc and ld, cached per test session by content."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

KERNEL_DIR = Path(__file__).parent / "guests" / "kernels"
CFLAGS = ["-m32", "-ffreestanding", "-nostdlib", "-fno-pic", "-static", "-fno-pie",
          "-O2", "-Wall", "-Werror", "-fno-stack-protector", "-mgeneral-regs-only",
          "-fno-asynchronous-unwind-tables", "-fno-builtin"]


class KernelBuildError(Exception):
    pass


def _run(argv):
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode:
        raise KernelBuildError(f"{' '.join(argv)} failed:\n{done.stderr}")


def toolchain_missing() -> str:
    """Why kernels cannot be built here, or "" if they can."""
    for tool in ("gcc", "ld", "objcopy"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return ""


CFLAGS_64 = ["-m64", "-mno-red-zone", "-mcmodel=small"]


def build_kernel(name: str, out_dir: Path, kludge: bool = False, bits: int = 32,
                 source: "Path | None" = None) -> Path:
    """tests/guests/kernels/<name>.c + entry.S + lib.c linked at 1 MiB: an
    ELF multiboot kernel, or with ``kludge`` a flat binary whose multiboot
    header carries the load addresses (flag 16).  ``bits=64``: entry64.S
    (its own long-mode entry) and 64-bit C, in an ELF64 file."""
    entry = "entry64.S" if bits == 64 else "entry.S"
    sources = [KERNEL_DIR / entry, KERNEL_DIR / "lib.c", source or KERNEL_DIR / f"{name}.c"]
    digest = hashlib.sha256()
    for path in sources + [KERNEL_DIR / "lib.h", KERNEL_DIR / "link.ld"]:
        digest.update(path.read_bytes())
    key = digest.hexdigest()[:12] + ("-kludge" if kludge else "") + f"-{bits}"
    out = out_dir / f"{name}-{key}{'.bin' if kludge else '.elf'}"
    if out.exists():
        return out
    work = out_dir / f"{name}-{key}.d"
    work.mkdir(exist_ok=True)
    objects = []
    for src in sources:
        obj = work / (src.stem + ".o")
        flags = [f for f in CFLAGS if f != "-m32"] + CFLAGS_64 if bits == 64 else CFLAGS
        _run(["gcc", *flags, *(["-DAOUT_KLUDGE"] if kludge else []), f"-I{KERNEL_DIR}", "-c", str(src),
              "-o", str(obj)])
        objects.append(str(obj))
    elf = work / "kernel.elf"
    _run(["ld", "-m", "elf_x86_64" if bits == 64 else "elf_i386", "-static", "-nostdlib", "--build-id=none", "--no-warn-rwx-segments", "-T",
          str(KERNEL_DIR / "link.ld"), "-o", str(elf), *objects])
    if kludge:
        _run(["objcopy", "-O", "binary", str(elf), str(out)])
    else:
        shutil.copy(elf, out)
    return out
