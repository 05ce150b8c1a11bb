"""The Linux boot protocol: setup-header checks, the zero page, the e820
map and initrd placement with no VM; then hand-made bzImages booted on KVM
whose 64-bit (or 32-bit) entry reports, on the debugcon port, what it was
given: rsi, the segments, the command line, the e820 table and the initrd.
"""

import glob
import struct

import pytest
from test_boot import module_hash

import pyvt
from pyvt import acpi, e820, pci
from pyvt.loaders import LoaderError, bzimage, detect, parse_setup_header

KERNEL_AT = 0x1000000
INIT_SIZE = 0x200000


def make_bzimage(payload: bytes, *, version=0x020F, xloadflags=bzimage.XLF_KERNEL_64,
                 relocatable=True, loadflags=bzimage.LOADED_HIGH, setup_sects=1,
                 init_size=INIT_SIZE, pref_address=KERNEL_AT, initrd_addr_max=0x7FFFFFFF,
                 cmdline_size=255, magic=b"HdrS", boot_flag=0xAA55, header_end=0x268):
    """A bzImage: boot sector and ``setup_sects`` sectors with the setup
    header, then ``payload`` as the protected-mode kernel."""
    setup = bytearray(((setup_sects or 4) + 1) * 512)
    setup[0x1F1] = setup_sects
    struct.pack_into("<H", setup, 0x1FE, boot_flag)
    setup[0x200:0x202] = bytes((0xEB, header_end - 0x202))
    setup[0x202:0x206] = magic
    struct.pack_into("<H", setup, 0x206, version)
    setup[0x211] = loadflags
    struct.pack_into("<I", setup, 0x214, 0x100000)
    struct.pack_into("<III", setup, 0x22C, initrd_addr_max, 0x200000, 0)
    setup[0x234] = int(relocatable)
    struct.pack_into("<HI", setup, 0x236, xloadflags, cmdline_size)
    struct.pack_into("<QI", setup, 0x258, pref_address, init_size)
    return bytes(setup) + payload


# -- no VM ------------------------------------------------------------------

def test_crafted_header_fields():
    h = parse_setup_header(make_bzimage(b"\x90" * 1024))
    assert (h.version, h.setup_sects, h.relocatable, h.entry_64) == (0x20F, 1, True, True)
    assert (h.pref_address, h.init_size, h.cmdline_size) == (KERNEL_AT, INIT_SIZE, 255)
    assert h.header_end == 0x268 and h.version_text == "2.15"
    # setup_sects 0 means 4; before 2.12 xloadflags is padding.
    assert parse_setup_header(make_bzimage(b"\x90", setup_sects=0)).setup_sects == 4
    assert not parse_setup_header(make_bzimage(b"\x90", version=0x020B)).entry_64


@pytest.mark.skipif(not glob.glob("/boot/vmlinuz-*"), reason="no /boot/vmlinuz-* here")
def test_debian_kernel_header():
    path = sorted(glob.glob("/boot/vmlinuz-*"))[-1]
    data = open(path, "rb").read()
    assert detect(data) == "bzimage"
    h = parse_setup_header(data)
    assert h.version >= 0x020C and h.entry_64 and h.relocatable
    assert h.pref_address % h.kernel_alignment == 0 and h.init_size > len(data)
    address = bzimage.load_address(h, len(data), 256 << 20, "kernel")
    assert address == h.pref_address


@pytest.mark.parametrize("change, message", [
    (dict(magic=b"Hdr!"), "not a Linux bzImage"),
    (dict(boot_flag=0x1234), "not a Linux bzImage"),
    (dict(version=0x0209), "boot protocol 2.09; pyvt boots 2.10 and later"),
    (dict(loadflags=0), "zImage"),
    (dict(header_end=0x240), "setup header ends at 0x240"),
])
def test_bad_headers_are_refused(change, message):
    data = make_bzimage(b"\x90" * 64, **change)
    with pytest.raises(LoaderError, match=message):
        parse_setup_header(data)


def test_detect_prefers_bzimage_and_keeps_the_others():
    assert detect(make_bzimage(b"\x90")) == "bzimage"
    assert detect(b"\x7fELF" + bytes(60)) == "elf"
    assert detect(b"\x90" * 1024) == "flat"


def test_load_address_and_room():
    h = parse_setup_header(make_bzimage(b"", pref_address=0x1100000))
    assert bzimage.load_address(h, 10, 64 << 20, "k") == 0x1200000  # aligned up to 2 MiB
    fixed = parse_setup_header(make_bzimage(b"", relocatable=False))
    assert bzimage.load_address(fixed, 10, 64 << 20, "k") == 0x100000  # code32_start
    with pytest.raises(LoaderError, match=r"needs RAM up to 0x1200000.*--memory"):
        bzimage.load_address(h if False else parse_setup_header(make_bzimage(b"")), 10,
                             16 << 20, "k")


def test_initrd_goes_high_under_its_limit_and_above_the_kernel():
    h = parse_setup_header(make_bzimage(b""))
    assert bzimage.place_initrd(h, 5000, KERNEL_AT + INIT_SIZE, 64 << 20) == (64 << 20) - 0x2000
    low = parse_setup_header(make_bzimage(b"", initrd_addr_max=0x1FFFFFF))
    assert bzimage.place_initrd(low, 0x1000, KERNEL_AT + INIT_SIZE, 64 << 20) == 0x1FFF000
    with pytest.raises(LoaderError, match="does not fit"):
        bzimage.place_initrd(h, 60 << 20, KERNEL_AT + INIT_SIZE, 64 << 20)


def test_e820_map_holes():
    size = 256 << 20
    assert e820.linux_memory_map(size) == [
        (0, 0x90000, e820.E820_RAM),
        (0x90000, 0x70000, e820.E820_RESERVED),  # pyvt's tables, EBDA, VGA, BIOS, ACPI
        (0x100000, size - 0x100000, e820.E820_RAM),
        (0xB0000000, pci.ECAM_SIZE, e820.E820_RESERVED),  # PCI ECAM
        (acpi.IOAPIC_ADDRESS, 0x1000, e820.E820_RESERVED),
        (acpi.LAPIC_ADDRESS, 0x1000, e820.E820_RESERVED),
    ]
    entries = e820.linux_memory_map(e820.RAM_LIMIT)
    assert entries[2][0] + entries[2][1] == pci.ECAM_BASE
    with pytest.raises(LoaderError, match="--memory 2816M"):
        e820.linux_memory_map(e820.RAM_LIMIT + 0x1000)
    with pytest.raises(LoaderError, match="more memory"):
        e820.linux_memory_map(1 << 20)
    assert e820.decode(e820.encode(entries), len(entries)) == entries


def test_boot_params_fields():
    data = make_bzimage(b"\x90" * 16)
    h = parse_setup_header(data)
    params = bzimage.boot_params(data, h, 64 << 20, 0x20000, (0x3000000, 12345), 0xE0000)
    assert params[0x1F1:0x268] != data[0x1F1:0x268]  # loader fields filled in...
    assert params[0x202:0x206] == b"HdrS" and params[0x268:0x1000].count(0) < 0xD98
    assert params[0x210] == 0xFF and params[0x211] == bzimage.LOADED_HIGH | bzimage.CAN_USE_HEAP
    assert struct.unpack_from("<H", params, 0x224)[0] == bzimage.HEAP_END
    assert struct.unpack_from("<III", params, 0x218) == (0x3000000, 12345, 0)
    assert struct.unpack_from("<I", params, 0x228)[0] == 0x20000
    assert struct.unpack_from("<Q", params, 0x70)[0] == 0xE0000
    assert struct.unpack_from("<III", params, 0xC0) == (0, 0, 0)
    count = params[0x1E8]
    assert e820.decode(params[0x2D0:], count) == e820.linux_memory_map(64 << 20)
    assert params[0x1EF] == 0  # the sentinel stays zero: the header was copied on purpose


def test_command_line_longer_than_cmdline_size_is_refused():
    with pyvt.Vm("64M") as vm:
        with pytest.raises(LoaderError, match="takes at most 255"):
            bzimage.load_bzimage(vm.memory, make_bzimage(b"\x90" * 1024), b"x" * 256)


# -- booted on KVM ---------------------------------------------------------

# The 64-bit entry: writes to debugcon rsi, CS, DS, SS, RFLAGS, the command
# line, the e820 table, type_of_loader, acpi_rsdp_addr and a hash of the
# initrd read through the zero page, then leaves through isa-debug-exit.
REPORT_64 = r"""
.code64
_start:
    mov %rsi, %rbx
    mov $0xe9, %dx
    mov %rsi, %rax
    call out8
    mov %cs, %ax
    call out2
    mov %ds, %ax
    call out2
    mov %ss, %ax
    call out2
    pushfq
    pop %rax
    call out8
    mov %cr0, %rax
    call out8
    mov 0x228(%rbx), %esi
1:  lodsb
    out %al, %dx
    test %al, %al
    jnz 1b
    movzbl 0x1e8(%rbx), %ecx
    mov %cl, %al
    out %al, %dx
    imul $20, %ecx, %ecx
    lea 0x2d0(%rbx), %rsi
    rep outsb
    mov 0x210(%rbx), %al
    out %al, %dx
    mov 0x70(%rbx), %rax
    call out8
    mov 0x218(%rbx), %esi
    mov 0x21c(%rbx), %edi
    mov %edi, %eax
    call out8
    mov %edi, %ecx
    xor %r8, %r8  # the hash test_boot.module_hash computes
    test %ecx, %ecx
    jz 3f
2:  imul $31, %r8, %r8
    movzbq (%rsi), %rax
    add %rax, %r8
    mov %r8d, %r8d
    inc %rsi
    dec %ecx
    jnz 2b
3:  mov %r8, %rax
    call out8
    mov $0xf4, %dx
    xor %al, %al
    out %al, %dx
    hlt
out8: mov $8, %ecx
    jmp 4f
out2: mov $2, %ecx
4:  out %al, %dx
    shr $8, %rax
    dec %ecx
    jnz 4b
    ret
"""

# The 32-bit entry: esi, CS, DS, CR0 (paging must be off).
REPORT_32 = r"""
.code32
_start:
    mov $0xe9, %dx
    mov %esi, %eax
    call out4
    mov %cs, %ax
    call out4
    mov %ds, %ax
    call out4
    mov %cr0, %eax
    call out4
    mov $0xf4, %dx
    xor %al, %al
    out %al, %dx
    hlt
out4: mov $4, %ecx
1:  out %al, %dx
    shr $8, %eax
    dec %ecx
    jnz 1b
    ret
"""


class Reader:
    def __init__(self, data):
        self.data, self.at = data, 0

    def take(self, n):
        chunk = self.data[self.at:self.at + n]
        assert len(chunk) == n, f"guest output ended at {self.at}: {self.data!r}"
        self.at += n
        return chunk

    def int(self, n):
        return int.from_bytes(self.take(n), "little")

    def cstring(self):
        end = self.data.index(b"\0", self.at)
        text = self.data[self.at:end]
        self.at = end + 1
        return text


@pytest.mark.requires_kvm
def test_64bit_entry_gets_boot_params(tmp_path):
    code = pyvt.assemble(REPORT_64, at=KERNEL_AT + 0x200, bits=64)
    # The 32-bit entry (load address) would fail the run: ud2.
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(make_bzimage(b"\x0f\x0b" * 0x100 + code))
    initrd = tmp_path / "initrd"
    blob = b"INITRD" + bytes(range(256)) * 20
    initrd.write_bytes(blob)
    with pyvt.Vm("64M") as vm:
        image = vm.boot(kernel, cmdline="console=ttyS0 answer=42", initrd=initrd,
                        irqchip=False)
        assert (image.kind, image.mode, image.entry) == ("bzimage", "long", KERNEL_AT + 0x200)
        exit = vm.run(timeout=60)
        out = Reader(vm.debugcon.output)
    assert isinstance(exit, pyvt.exits.DebugExit) and exit.code == 0, exit
    assert out.int(8) == bzimage.BOOT_PARAMS_ADDRESS
    assert (out.int(2), out.int(2), out.int(2)) == (bzimage.BOOT_CS, bzimage.BOOT_DS,
                                                    bzimage.BOOT_DS)
    assert not out.int(8) & (1 << 9)  # interrupts off
    assert out.int(8) & (1 << 31)  # paging on
    assert out.cstring() == b"console=ttyS0 answer=42"
    count = out.int(1)
    assert e820.decode(out.take(count * 20), count) == e820.linux_memory_map(64 << 20)
    assert out.int(1) == 0xFF  # type_of_loader
    assert out.int(8) == acpi.RSDP_ADDRESS
    assert out.int(8) == len(blob)
    assert out.int(8) == module_hash(blob)
    assert image.modules == [((64 << 20) - 0x2000, (64 << 20) - 0x2000 + len(blob))]


@pytest.mark.requires_kvm
def test_32bit_entry_without_xlf_kernel_64(tmp_path):
    code = pyvt.assemble(REPORT_32, at=KERNEL_AT, bits=32)
    data = make_bzimage(code, xloadflags=0)
    with pyvt.Vm("32M") as vm:
        image = vm.boot(data, irqchip=False)
        assert (image.mode, image.entry) == ("protected", KERNEL_AT)
        exit = vm.run(timeout=60)
        out = Reader(vm.debugcon.output)
    assert isinstance(exit, pyvt.exits.DebugExit) and exit.code == 0, exit
    assert out.int(4) == bzimage.BOOT_PARAMS_ADDRESS
    assert (out.int(4) & 0xFFFF, out.int(4) & 0xFFFF) == (bzimage.BOOT_CS, bzimage.BOOT_DS)
    cr0 = out.int(4)
    assert cr0 & 1 and not cr0 & (1 << 31)  # protected mode, no paging


@pytest.mark.requires_kvm
def test_boot_refuses_what_does_not_fit(tmp_path):
    data = make_bzimage(b"\x90" * 1024)
    with pyvt.Vm("16M") as vm:
        with pytest.raises(LoaderError, match=r"needs RAM up to 0x1200000"):
            vm.boot(data, irqchip=False)
    with pyvt.Vm("32M") as vm:
        with pytest.raises(LoaderError, match="initrd"):
            vm.boot(data, initrd=bytes(20 << 20), irqchip=False)


# -- PVH (an ELF kernel with XEN_ELFNOTE_PHYS32_ENTRY) ----------------------

# Its ELF entry is ud2; the PVH entry reports ebx, hvm_start_info's magic,
# version and module count, CR4, CR0, the command line, the memory map,
# the RSDP address, and the module's size and hash.
PVH_KERNEL = r"""
.section .note.Xen, "a", @note
.align 4
.long 4, 4, 18
.asciz "Xen"
.long pvh_start
.text
.globl _start
_start:
    ud2
pvh_start:
    mov %ebx, %ebp
    mov $0xe9, %dx
    mov %ebx, %eax
    call out4
    mov (%ebp), %eax
    call out4
    mov 4(%ebp), %eax
    call out4
    mov 12(%ebp), %eax
    call out4
    mov %cr4, %eax
    call out4
    mov %cr0, %eax
    call out4
    mov 24(%ebp), %esi
1:  lodsb
    out %al, %dx
    test %al, %al
    jnz 1b
    mov 48(%ebp), %ecx
    mov %cl, %al
    out %al, %dx
    imul $24, %ecx, %ecx
    mov 40(%ebp), %esi
    rep outsb
    mov 32(%ebp), %eax
    call out4
    mov 16(%ebp), %edi
    mov (%edi), %esi
    mov 8(%edi), %edi
    mov %edi, %eax
    call out4
    mov %edi, %ecx
    xor %ebx, %ebx
2:  imul $31, %ebx, %ebx
    movzbl (%esi), %eax
    add %eax, %ebx
    inc %esi
    dec %ecx
    jnz 2b
    mov %ebx, %eax
    call out4
    mov $0xf4, %dx
    xor %al, %al
    out %al, %dx
    hlt
out4: mov $4, %ecx
3:  out %al, %dx
    shr $8, %eax
    dec %ecx
    jnz 3b
    ret
"""


@pytest.fixture
def pvh_kernel(tmp_path):
    import subprocess

    src, obj, elf = tmp_path / "pvh.S", tmp_path / "pvh.o", tmp_path / "pvh.elf"
    src.write_text(PVH_KERNEL)
    subprocess.run(["as", "--32", "-o", obj, src], check=True)
    # The note where vmlinux has it: in the image, after the code.
    subprocess.run(["ld", "-m", "elf_i386", "-Ttext=0x100000", "--section-start=.note.Xen=0x101000",
                    "-e", "_start", "-o", elf, obj],
                   check=True)
    return elf


def test_pvh_note_is_found(pvh_kernel):
    from pyvt.loaders import find_pvh_entry, parse_elf

    data = pvh_kernel.read_bytes()
    assert detect(data) == "pvh"
    assert find_pvh_entry(data) == parse_elf(data).entry + 2  # past the ud2
    assert find_pvh_entry(b"\x7fELF" + bytes(60)) is None
    assert detect(data.replace(b"Xen\0", b"Xex\0")) == "elf"


@pytest.mark.requires_kvm
def test_pvh_entry_gets_start_info(pvh_kernel):
    from pyvt.loaders import pvh

    blob = b"PVH-INITRD" + bytes(range(256)) * 8
    with pyvt.Vm("32M") as vm:
        image = vm.boot(pvh_kernel, cmdline="root=/dev/vda pvh=1", initrd=blob, irqchip=False)
        assert (image.kind, image.mode) == ("pvh", "protected")
        exit = vm.run(timeout=60)
        out = Reader(vm.debugcon.output)
    assert isinstance(exit, pyvt.exits.DebugExit) and exit.code == 0, exit
    assert out.int(4) == pvh.START_INFO_ADDRESS
    assert (out.int(4), out.int(4), out.int(4)) == (pvh.HVM_START_MAGIC, 1, 1)
    assert out.int(4) == 0  # CR4 clear
    cr0 = out.int(4)
    assert cr0 & 1 and not cr0 & (1 << 31)
    assert out.cstring() == b"root=/dev/vda pvh=1"
    count = out.int(1)
    table = out.take(count * 24)
    assert [struct.unpack_from("<QQI", table, i * 24) for i in range(count)] == \
        e820.linux_memory_map(32 << 20)
    assert out.int(4) == acpi.RSDP_ADDRESS
    assert out.int(4) == len(blob)
    assert out.int(4) == module_hash(blob)


def test_hypervisor_and_tsc_deadline_bits_are_set_for_the_guest():
    # Without them Linux never looks for KVM's leaves (no kvm-clock) and
    # calibrates the LAPIC timer against the PIT.
    from pyvt.boot import cpuid_guest_flags
    from pyvt.kvm import CpuidEntry

    leaves = [CpuidEntry(0, 0, 0, 0xD, 0, 0, 0), CpuidEntry(1, 0, 0, 0xA10F11, 0, 0x1202000, 0),
              CpuidEntry(0x40000000, 0, 0, 0x40000001, 0x4B4D564B, 0x564B4D56, 0x4D)]
    out = cpuid_guest_flags(leaves, tsc_deadline=False)
    assert out[1].ecx == 0x81202000 and (out[0], out[2]) == (leaves[0], leaves[2])
    assert cpuid_guest_flags(leaves, tsc_deadline=True)[1].ecx == 0x81202000 | (1 << 24)
