"""ELF kernels linked the usual way, ``ld -Ttext=0x100000``: their first
PT_LOAD segment sits at 0xff000 and holds only the ELF and program headers,
in the PC's 0xa0000-0xfffff hole.  pyvt loads them as QEMU does (without
that segment) and still refuses code or data in the hole.  The kernels are
built here with the system toolchain."""

import shutil
import subprocess

import pytest

import pyvt
from pyvt.loaders import LoaderError, parse_elf

pytestmark = pytest.mark.skipif(not (shutil.which("as") and shutil.which("ld")),
                                reason="needs binutils (as, ld)")

# Leaves through isa-debug-exit with code 5 after writing a .data word to
# debugcon; a multiboot header makes the same file a multiboot kernel too.
MULTIBOOT_HEADER = ".long 0x1BADB002, 0, -0x1BADB002\n"
KERNEL = r"""
.text
HEADER
.globl _start
_start:
    mov value, %eax
    mov $0xe9, %dx
    out %al, %dx
    mov $0xf4, %dx
    mov $5, %al
    out %al, %dx
    hlt
.data
value: .long 0x4b
.bss
scratch: .space 8192
"""


def link(tmp_path, bits, text, multiboot=False):
    src, obj, elf = (tmp_path / f"k{bits}.{ext}" for ext in ("S", "o", "elf"))
    src.write_text(KERNEL.replace("HEADER", MULTIBOOT_HEADER if multiboot else ""))
    subprocess.run(["as", f"--{bits}", "-o", obj, src], check=True)
    subprocess.run(["ld", "-m", "elf_i386" if bits == 32 else "elf_x86_64",
                    f"-Ttext={text:#x}", "-e", "_start", "-o", elf, obj], check=True)
    return elf


@pytest.mark.parametrize("bits", [32, 64])
def test_header_only_segment_is_recognised(tmp_path, bits):
    elf = parse_elf(link(tmp_path, bits, 0x100000).read_bytes())
    assert elf.segments[0].address == 0xFF000, "the linker no longer puts headers there"
    assert elf.header_segments == (elf.segments[0],)
    assert [s.address for s in elf.loadable()] == [s.address for s in elf.segments[1:]]


@pytest.mark.requires_kvm
@pytest.mark.parametrize("bits, multiboot", [(32, False), (64, False), (32, True)],
                         ids=["elf32", "elf64", "multiboot"])
def test_kernel_linked_at_1mib_boots(tmp_path, bits, multiboot):
    path = link(tmp_path, bits, 0x100000, multiboot)
    with pyvt.Vm("16M") as vm:
        image = vm.boot(path, irqchip=False)
        assert image.kind == ("multiboot" if multiboot else f"elf{bits}")
        assert all(s.address >= 0x100000 for s in image.segments)
        exit = vm.run(timeout=30)
        assert vm.memory.read(0xFF000, 0x1000) == bytes(0x1000)  # nothing written there
        assert vm.debugcon.output == b"K"
    assert isinstance(exit, pyvt.exits.DebugExit) and exit.code == 5, exit


@pytest.mark.requires_kvm
def test_code_in_the_hole_is_still_refused(tmp_path):
    path = link(tmp_path, 32, 0xFF800)
    with pyvt.Vm("16M") as vm:
        with pytest.raises(LoaderError, match="overlaps 0xa0000-0xfffff"):
            vm.boot(path, irqchip=False)
