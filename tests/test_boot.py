"""Booting kernels: the multiboot, ELF and flat loaders, SMP with INIT/SIPI,
the ACPI tables, ``vm.boot``/``vm.run`` and ``python -m pyvt boot``.

The multiboot kernels (tests/guests/kernels/) are freestanding C built by the
test run; each checks from inside the guest what it was given, prints it on
the serial port and leaves through isa-debug-exit: status 1 (code 0) when
every check passed, 3 after a ``FAIL:`` line.
"""

import os
import resource
import struct
import subprocess
import sys

import pytest
from guestbuild import GUEST_DIR
from kernelbuild import build_kernel, toolchain_missing

import pyvt
from pyvt import acpi, exits
from pyvt.loaders import LoaderError, detect, find_multiboot_header, parse_elf

pytestmark = [pytest.mark.requires_kvm,
              pytest.mark.skipif(bool(toolchain_missing()), reason=toolchain_missing() or "ok")]

PASS_STATUS = 1  # debug-exit code 0
# SMP, the MADT and hlt-waits-for-interrupts need KVM's in-kernel irqchip; the
# other tests boot with irqchip=False so that they run on every backend.
needs_irqchip = pytest.mark.requires_cap("IRQCHIP")
PACKAGE_PARENT = os.path.dirname(os.path.dirname(pyvt.__file__))


@pytest.fixture(scope="session")
def kernel(tmp_path_factory):
    out = tmp_path_factory.mktemp("kernels")
    return lambda name, kludge=False, bits=32: build_kernel(name, out, kludge, bits)


@pytest.fixture
def initrd(tmp_path):
    path = tmp_path / "initrd.img"
    path.write_bytes(b"INITRD:" + bytes(range(256)) * 40)
    return path


def module_hash(data):
    value = 0
    for byte in data:
        value = (value * 31 + byte) & 0xFFFFFFFF
    return value


def boot(kernel_path, memory="32M", timeout=20, **kw):
    with pyvt.Vm(memory) as vm:
        for name, data in kw.pop("files", {}).items():
            vm.fw_cfg.add_file(name, data)
        vm.boot(kernel_path, **kw)
        exit = vm.run(timeout=timeout)
        return exit, vm.console.text


def elf_from_assembly(tmp_path, name, bits, at=0x100000):
    """tests/guests/<name>.S linked as an ELF executable at ``at``."""
    obj, elf = tmp_path / f"{name}.o", tmp_path / f"{name}.elf"
    subprocess.run(["as", "--64" if bits == 64 else "--32", "-o", obj, GUEST_DIR / f"{name}.S"],
                   check=True)
    subprocess.run(["ld", "-N", "-m", "elf_x86_64" if bits == 64 else "elf_i386", "-Ttext", hex(at),
                    "-e", "_start", "-o", elf, obj], check=True)
    return elf


# -- multiboot ----------------------------------------------------------------

@pytest.mark.parametrize("kludge", [False, True], ids=["elf", "aout-kludge"])
def test_multiboot_info_cmdline_modules_and_memory_map(kernel, initrd, kludge):
    path = kernel("multiboot_info", kludge)
    assert detect(path.read_bytes()) == "multiboot"
    assert bool(find_multiboot_header(path.read_bytes()).flags & 0x10000) == kludge
    exit, text = boot(path, "64M", cmdline="console=ttyS0 answer=42", initrd=initrd,
                      irqchip=False)
    assert isinstance(exit, exits.DebugExit) and exit.status == PASS_STATUS, text
    data = initrd.read_bytes()
    assert text.splitlines() == [
        "mem_lower=639",
        f"mem_upper={(64 - 1) * 1024}",
        "loader=pyvt",
        f"cmdline={path} console=ttyS0 answer=42",  # the kernel's path first, as GRUB/QEMU
        "mmap 0x00000000 0x0009fc00 1",
        "mmap 0x0009fc00 0x00000400 2",
        "mmap 0x000e0000 0x00020000 2",
        "mmap 0x00100000 0x03f00000 1",
        "mods=1",
        f"mod 0 size={len(data)} hash={module_hash(data):#010x} string={initrd} head=INITRD:\0",
        "PASS",
    ]


def test_multiboot_extra_modules_follow_the_initrd(kernel, initrd):
    exit, text = boot(kernel("multiboot_info"), initrd=initrd,
                      modules=[(b"second module", "mod2 arg=1")], kernel_name="/boot/k",
                      irqchip=False)
    assert exit.status == PASS_STATUS, text
    assert "cmdline=/boot/k\n" in text
    assert "mods=2" in text
    assert "mod 1 size=13 " in text and "string=mod2 arg=1 head=second m" in text


def test_multiboot_strings_are_bytes_as_given(kernel):
    # A str's undecodable bytes (PEP 383 escapes, as in argv and file names)
    # reach the guest as they were; bytes as they are.
    with pyvt.Vm("32M") as vm:
        vm.boot(kernel("multiboot_info"), cmdline=b"a=\xff\xfe", kernel_name="/boot/k\udcff",
                modules=[(b"module", b"m\xfe arg")], irqchip=False)
        exit = vm.run(timeout=20)
        out = vm.console.output
    assert exit.status == PASS_STATUS, out
    assert b"cmdline=/boot/k\xff a=\xff\xfe\n" in out
    assert b"string=m\xfe arg head=module" in out


def test_multiboot_strings_that_cannot_reach_the_guest_are_refused(kernel):
    with pyvt.Vm("32M") as vm:
        with pytest.raises(LoaderError, match="contains a NUL byte"):
            vm.boot(kernel("multiboot_info"), cmdline="a\0b", irqchip=False)
        with pytest.raises(LoaderError, match=r"cmdline .* cannot be encoded \(surrogates not allowed"):
            vm.boot(kernel("multiboot_info"), cmdline="\ud800", irqchip=False)
        with pytest.raises(LoaderError, match="cmdline must be a str or bytes, not int"):
            vm.boot(kernel("multiboot_info"), cmdline=1, irqchip=False)
        with pytest.raises(LoaderError, match="module 0's string"):
            vm.boot(kernel("multiboot_info"), modules=[(b"m", b"a\0")], irqchip=False)
        assert not vm.vcpus  # refused before anything was done


@needs_irqchip
def test_multiboot_elf64_kernel_enters_long_mode_itself(kernel):
    path = kernel("long_mode", bits=64)
    assert parse_elf(path.read_bytes()).bits == 64
    with pyvt.Vm("32M") as vm:
        image = vm.boot(path, cmdline="x=1")
        assert (image.kind, image.mode) == ("multiboot", "protected")  # as the spec says
        exit = vm.run(timeout=20)
        assert isinstance(exit, exits.DebugExit) and exit.status == PASS_STATUS, vm.console.text
        assert vm.console.text.splitlines() == [
            "mode=long", "shifted_gib=1024", f"cmdline={path} x=1", "fw_cfg=QEMU", "PASS"]


# -- platform: fw_cfg, ACPI, PM timer, CPUID, CMOS ----------------------------

@needs_irqchip
@pytest.mark.parametrize("smp", [1, 3])
def test_platform_as_the_guest_sees_it(kernel, smp):
    exit, text = boot(kernel("platform"), smp=smp, files={"opt/pyvt/greeting": b"hello fw_cfg"})
    assert isinstance(exit, exits.DebugExit) and exit.status == PASS_STATUS, text
    lines = text.splitlines()
    if smp == 1:  # HTT (more than one logical CPU) is the host's bit, 1 on some hosts
        lines.remove(next(line for line in lines if line.startswith("cpuid_htt=")))
    assert lines == [
        "fw_cfg=QEMU",
        f"fw_cfg_cpus={smp}",
        "fw_cfg_ram_mib=32",
        "greeting=hello fw_cfg",
        f"pm_tmr_blk={0x608}",
        "tmr_val_ext=1",
        f"reset_reg={0x64}",
        f"reset_value={0xFE}",
        f"century={0x32}",
        f"ioapic_address={0xFEC00000}",
        f"madt_lapics={smp}",
        "madt_ioapics=1",
        "pm_timer=advancing",
        "apic_id=0",
        f"cpuid_logical={smp}",
        *(["cpuid_htt=1"] if smp > 1 else []),
        f"x2apic_cores={smp}",
        f"cmos_ext_kib={31 * 1024}",
        "pci_00_0=0xffffffff",
        "unbacked_mmio=0xffffffff",
        "PASS",
    ]


@needs_irqchip
def test_cpuid_topology_per_vcpu_and_overridable():
    with pyvt.Vm("32M") as vm:
        vm.boot(b"\xf4" * 16, format="flat", smp=3)
        for index, cpu in vm.vcpus.items():
            leaf1 = next(e for e in cpu.cpuid if e.function == 1)
            assert (leaf1.ebx >> 24, (leaf1.ebx >> 16) & 0xFF) == (index, 3)
            levels = {e.index: e for e in cpu.cpuid if e.function == 0xB}
            if levels:
                assert (levels[1].ebx, levels[1].eax, levels[1].edx) == (3, 2, index)
                assert (levels[2].ecx >> 8) & 0xFF == 0  # the list ends
        # Python can still change what a guest sees, between boot() and run().
        cpu = vm.vcpus[0]
        cpu.cpuid = [e if e.function != 1
                     else pyvt.kvm.CpuidEntry(1, 0, 0, 0x000306A9, e.ebx, e.ecx, e.edx)
                     for e in cpu.cpuid]
        assert next(e for e in cpu.cpuid if e.function == 1).eax == 0x000306A9


def test_platform_kernel_fails_without_its_fw_cfg_file(kernel):
    exit, text = boot(kernel("platform"), irqchip=False)
    assert exit.status == 3
    assert "FAIL: fw_cfg has no opt/pyvt/greeting" in text


def test_acpi_tables_have_valid_checksums():
    tables = acpi.build(4)
    rsdp = tables[acpi.RSDP_ADDRESS]
    assert rsdp[:8] == b"RSD PTR " and sum(rsdp[:20]) % 256 == 0 and sum(rsdp) % 256 == 0
    for address, data in tables.items():
        if address != acpi.RSDP_ADDRESS:
            assert sum(data) % 256 == 0
            assert struct.unpack_from("<I", data, 4)[0] == len(data)
    madt = tables[acpi.MADT_ADDRESS]
    assert madt.count(bytes([0, 8])) >= 4
    assert acpi.MADT_ADDRESS not in acpi.build(1, irqchip=False)
    with pytest.raises(pyvt.ArgumentError):
        acpi.build(0)


# -- SMP ---------------------------------------------------------------------

@needs_irqchip
@pytest.mark.parametrize("smp", [2, 4])
def test_smp_every_ap_checks_in(kernel, smp):
    exit, text = boot(kernel("smp"), smp=smp)
    assert isinstance(exit, exits.DebugExit) and exit.status == PASS_STATUS, text
    assert f"cpus={smp}\n" in text
    assert f"checked_in={smp - 1}\n" in text
    assert f"apic_mask={(1 << smp) - 1:#010x}\n" in text


@needs_irqchip
def test_an_ap_exiting_stops_every_vcpu(kernel):
    exit, text = boot(kernel("smp"), smp=3, cmdline="ap-exit")
    assert isinstance(exit, exits.DebugExit) and exit.code == 5, (exit, text)
    assert text.endswith("ap exits\n") and "PASS" not in text


@needs_irqchip
def test_one_vcpu_timing_out_stops_all(kernel):
    exit, text = boot(kernel("spin"), smp=2, timeout=0.5)
    assert isinstance(exit, exits.Timeout), exit
    assert text == "spinning\n"


# -- ELF and flat --------------------------------------------------------------

def test_elf64_enters_long_mode(tmp_path):
    elf = elf_from_assembly(tmp_path, "debug_exit", 64)
    assert parse_elf(elf.read_bytes()).bits == 64
    with pyvt.Vm("16M") as vm:
        image = vm.boot(elf, irqchip=False)
        assert (image.kind, image.mode, image.entry) == ("elf64", "long", 0x100000)
        exit = vm.run(timeout=10)
        assert isinstance(exit, exits.DebugExit) and exit.code == 0x2A


def test_elf32_enters_protected_mode(tmp_path):
    elf = elf_from_assembly(tmp_path, "uart_hello_protected", 32)
    with pyvt.Vm("16M") as vm:
        image = vm.boot(elf, irqchip=False)
        assert (image.kind, image.mode) == ("elf32", "protected")
        exit = vm.run(timeout=10)
        assert isinstance(exit, exits.Hlt), exit
        assert vm.console.text == "hello from protected mode\n"


def test_flat_binary_at_an_address(guest):
    with pyvt.Vm("16M") as vm:
        image = vm.boot(guest("debug_exit", 0x200000), format="flat", load_address=0x200000,
                        irqchip=False)
        assert (image.kind, image.entry) == ("flat", 0x200000)
        assert isinstance(vm.run(timeout=10), exits.DebugExit)


@pytest.mark.parametrize("cmdline,raw", [("root=/x", b"root=/x"), (b"root=/\xff", b"root=/\xff"),
                                         ("root=/\udcff", b"root=/\xff")])
def test_flat_kernel_reads_cmdline_and_initrd_from_fw_cfg(guest, cmdline, raw):
    with pyvt.Vm("16M") as vm:
        script = [(2, 0x510, 0x14), (7, 0x511, 4), (2, 0x510, 0x15), (7, 0x511, 9),
                  (2, 0x510, 0x0B), (7, 0x511, 4), (2, 0x510, 0x12), (7, 0x511, 6), (0, 0, 0)]
        vm.memory.write(0x3000, b"".join(struct.pack("<BxHI", *step) for step in script))
        vm.boot(guest("port_script"), format="flat", load_address=0x1000,
                cmdline=cmdline, initrd=b"INITRD", irqchip=False)
        assert isinstance(vm.run(timeout=10), exits.Hlt)
        assert vm.memory.read(0x8000, 23) == (struct.pack("<I", 8) + raw + b"\0\0"
                                               + struct.pack("<I", 6) + b"INITRD")


def test_acpi_reset_register_resets(kernel):
    exit, text = boot(kernel("acpi_reset"), irqchip=False)
    assert isinstance(exit, exits.Reset) and exit.source == "i8042", (exit, text)
    assert text == "resetting\n"
    out = pyvt_boot(kernel("acpi_reset"), "--memory", "32M", "--no-irqchip")
    assert out.returncode == 0 and "Reset(source='i8042'" in out.stderr


# -- unclaimed I/O: like a PC, --strict-io, --trace-io ---------------------------

SCRIPT = [(6, 0x300, 0), (3, 0xCF8, 0x80000000), (6, 0xCFC, 0), (0, 0, 0)]


def _script_vm(guest, **kw):
    vm = pyvt.Vm("16M")
    vm.memory.write(0x3000, b"".join(struct.pack("<BxHI", *step) for step in SCRIPT))
    vm.boot(guest("port_script"), format="flat", load_address=0x1000, irqchip=False, **kw)
    return vm


def test_unclaimed_io_reads_all_ones(guest):
    with _script_vm(guest) as vm:
        assert isinstance(vm.run(timeout=10), exits.Hlt)
        # No device at 0x300; PCI config space at 0xcf8/0xcfc reports no device.
        assert struct.unpack("<II", vm.memory.read(0x8000, 8)) == (0xFFFFFFFF, 0xFFFFFFFF)


def test_trace_io_keeps_the_timeout_budget():
    """A guest that does nothing but unclaimed I/O still times out."""
    with pyvt.Vm("16M") as vm:
        vm.boot(bytes([0xE5, 0x30, 0xEB, 0xFC]), format="flat",  # 1: in $0x30, %eax; jmp 1b
                load_address=0x1000, irqchip=False)
        with open(os.devnull, "w") as sink:
            exit = vm.run(timeout=0.2, trace_io=sink)
        assert isinstance(exit, exits.Timeout) and exit.timeout == 0.2, exit


def test_python_handlers_take_ports_in_a_booted_vm(guest):
    with _script_vm(guest) as vm:
        vm.on_io((0x300, 4), lambda e: 0x12345678)
        vm.on_io((0xCF8, 8), lambda e: 0 if e.is_write else 0x80861237)  # a "host bridge"
        assert isinstance(vm.run(timeout=10), exits.Hlt)
        assert struct.unpack("<II", vm.memory.read(0x8000, 8)) == (0x12345678, 0x80861237)


def test_strict_io_stops_at_the_first_unclaimed_access(guest):
    with _script_vm(guest, strict_io=True) as vm:
        exit = vm.run(timeout=10)
        assert isinstance(exit, exits.Io) and (exit.port, exit.direction) == (0x300, "in")


def test_trace_io_logs_and_continues(guest, tmp_path):
    log = tmp_path / "trace.txt"
    with _script_vm(guest) as vm, open(log, "w") as f:
        assert isinstance(vm.run(timeout=10, trace_io=f), exits.Hlt)
        assert struct.unpack("<II", vm.memory.read(0x8000, 8)) == (0xFFFFFFFF, 0xFFFFFFFF)
        assert vm._machine.unclaimed_as_pc  # as it was before the traced run
    lines = log.read_text().splitlines()
    assert lines[0].startswith("pyvt: unclaimed read port 0x300 size 4")
    assert lines[1].startswith("pyvt: unclaimed write port 0xcf8 size 4 0x80000000")
    assert len(lines) == 3


# -- bad kernels and arguments ---------------------------------------------------

def test_bad_kernels_get_clear_errors(tmp_path, kernel, guest):
    mb = kernel("multiboot_info")
    with pyvt.Vm("16M") as vm:
        with pytest.raises(LoaderError, match="not an ELF"):
            vm.boot(b"\x90" * 64, format="elf")
    with pyvt.Vm("16M") as vm:
        with pytest.raises(LoaderError, match="no multiboot header"):
            vm.boot(elf_from_assembly(tmp_path, "debug_exit", 64), format="multiboot")
    with pyvt.Vm("1M") as vm:
        with pytest.raises(LoaderError, match="outside guest RAM"):
            vm.boot(mb)
    with pyvt.Vm("16M") as vm:
        with pytest.raises(LoaderError, match="pyvt's GDT"):
            vm.boot(guest("debug_exit", 0x90000), format="flat", load_address=0x90000)
    with pyvt.Vm("16M") as vm:
        with pytest.raises(LoaderError, match="does not fit in guest RAM"):
            vm.boot(mb, initrd=bytes(16 << 20))
    with pyvt.Vm("16M") as vm:
        with pytest.raises(pyvt.boot.BootError, match="smp"):
            vm.boot(mb, smp=0)
        with pytest.raises(pyvt.boot.BootError, match="irqchip"):
            vm.boot(mb, smp=2, irqchip=False)
        with pytest.raises(pyvt.boot.BootError, match="cannot read"):
            vm.boot(tmp_path / "missing")
        with pytest.raises(pyvt.boot.BootError, match="only a multiboot kernel"):
            vm.boot(guest("debug_exit", 0x100000), format="flat", modules=[(b"x", "m")])
    with pyvt.Vm("16M") as vm:
        vm.vcpu(0)
        with pytest.raises(pyvt.boot.BootError, match="fresh Vm"):
            vm.boot(mb)


def test_files_larger_than_guest_ram_are_refused_before_they_are_read(kernel, tmp_path):
    sparse = tmp_path / "sparse.img"
    os.truncate(os.open(sparse, os.O_CREAT | os.O_WRONLY), 1 << 40)  # 1 TiB, none of it on disk
    mb = kernel("multiboot_info")
    with pyvt.Vm("16M") as vm:
        with pytest.raises(pyvt.boot.BootError, match=r"kernel .*sparse.img \(1099511627776 "
                           r"bytes\) is larger than the 0x1000000 bytes of guest RAM"):
            vm.boot(sparse)
        with pytest.raises(pyvt.boot.BootError, match="kernel /dev/zero is larger than the "
                           "0x1000000 bytes"):
            vm.boot("/dev/zero")  # no size to check: read no further than 16 MiB + 1
        with pytest.raises(pyvt.boot.BootError, match="initrd /dev/zero is larger"):
            vm.boot(mb, initrd="/dev/zero")
        with pytest.raises(pyvt.boot.BootError, match="module .*sparse.img .* is larger"):
            vm.boot(mb, modules=[(sparse, "m")])
        with pytest.raises(pyvt.boot.BootError, match="cannot read kernel /: Is a directory"):
            vm.boot("/")
        assert not vm.vcpus


def test_too_little_memory_is_refused_before_anything_changes(guest):
    with pyvt.Vm("512K") as vm:
        for _ in range(2):  # nothing was half-done: the same answer again
            with pytest.raises(pyvt.boot.BootError, match="at least 640 KiB"):
                vm.boot(guest("debug_exit"), format="flat", load_address=0x1000)
        assert not vm.vcpus
    with pyvt.Vm("768K") as vm:
        with pytest.raises(pyvt.boot.BootError, match="acpi=False"):
            vm.boot(guest("debug_exit"), format="flat", load_address=0x1000)
        vm.boot(guest("debug_exit"), format="flat", load_address=0x1000, acpi=False,
                irqchip=False)
        assert isinstance(vm.run(timeout=10), exits.DebugExit)


def test_multiboot_kludge_overlapping_loader_data_is_refused():
    flags = 0x10003
    header = struct.pack("<8I", 0x1BADB002, flags, -(0x1BADB002 + flags) & 0xFFFFFFFF,
                         0x10000, 0x10000, 0, 0, 0x10000)
    with pyvt.Vm("16M") as vm:
        with pytest.raises(LoaderError, match="multiboot information area"):
            vm.boot(header + b"\xf4" * 64)


def test_elf_validation():
    with pytest.raises(LoaderError, match="truncated"):
        parse_elf(b"\x7fELF\x01\x01\x01")
    bad_machine = bytearray(52)
    bad_machine[:7] = b"\x7fELF\x01\x01\x01"
    struct.pack_into("<HH", bad_machine, 16, 2, 40)  # ET_EXEC, ARM
    with pytest.raises(LoaderError, match="not x86"):
        parse_elf(bytes(bad_machine))
    struct.pack_into("<HH", bad_machine, 16, 3, 3)  # ET_DYN
    with pytest.raises(LoaderError, match="position-independent"):
        parse_elf(bytes(bad_machine))


# -- the command line ---------------------------------------------------------

def pyvt_boot(*args, timeout=60, stdin=""):
    return subprocess.run([sys.executable, "-m", "pyvt", "boot", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=PACKAGE_PARENT,
                          input=stdin)


def test_cli_boot_passes_stdin_to_the_serial_port(kernel):
    out = pyvt_boot(kernel("echo"), "--memory", "32M", "--timeout", 20, "--no-irqchip",
                    stdin="hello from stdin\n")
    assert out.returncode == PASS_STATUS, out.stderr
    assert out.stdout == "ready\ngot=hello from stdin\nPASS\n"
    out = pyvt_boot(kernel("echo"), "--memory", "32M", "--timeout", 1, "--no-stdin", "--no-irqchip",
                    stdin="ignored\n")
    assert out.returncode == 124 and out.stdout == "ready\n"


@needs_irqchip
def test_cli_boot_exits_with_the_debug_exit_status(kernel, initrd):
    out = pyvt_boot(kernel("smp"), "--smp", 2, "--memory", "32M", "--timeout", 20)
    assert out.returncode == PASS_STATUS, out.stderr
    assert "checked_in=1\napic_mask=0x00000003\nPASS\n" in out.stdout
    assert "DebugExit(code=0x0, status=1" in out.stderr
    out = pyvt_boot(kernel("multiboot_info"), "--append", "a b", "--initrd", initrd,
                    "--memory", "32M", "--no-irqchip", "--strict-io")
    assert out.returncode == PASS_STATUS, out.stderr
    assert f"cmdline={kernel('multiboot_info')} a b\n" in out.stdout
    out = pyvt_boot(kernel("platform"), "--memory", "32M")  # no greeting file: FAIL
    assert out.returncode == 3 and "FAIL:" in out.stdout


def test_cli_boot_passes_undecodable_bytes_through(kernel, initrd, tmp_path):
    # --append and the file names as the user's bytes, UTF-8 or not
    path = os.path.join(os.fsencode(tmp_path), b"mb\xff.elf")
    with open(path, "wb") as f:
        f.write(kernel("multiboot_info").read_bytes())
    initrd_path = os.path.join(os.fsencode(tmp_path), b"initrd\xfe")
    os.link(initrd, initrd_path)
    out = subprocess.run([sys.executable, "-m", "pyvt", "boot", path, "--append", b"\xff\xfe a=1",
                          "--initrd", initrd_path, "--memory", "32M", "--no-irqchip",
                          "--timeout", "20"], capture_output=True, timeout=60,
                         cwd=PACKAGE_PARENT, stdin=subprocess.DEVNULL)
    assert out.returncode == PASS_STATUS, out.stderr
    assert b"cmdline=" + path + b" \xff\xfe a=1\n" in out.stdout
    assert b" string=" + initrd_path + b" head=INITRD:" in out.stdout


def test_cli_boot_refuses_input_larger_than_guest_ram(kernel, tmp_path):
    sparse = tmp_path / "sparse.img"
    os.truncate(os.open(sparse, os.O_CREAT | os.O_WRONLY), 1 << 30)

    def address_space_limit():  # room for pyvt and its 16M guest, not for 1 GiB
        resource.setrlimit(resource.RLIMIT_AS, (400 << 20, 400 << 20))

    for args in ([sparse], ["/dev/zero"], [kernel("multiboot_info"), "--initrd", "/dev/zero"]):
        out = subprocess.run([sys.executable, "-m", "pyvt", "boot", *map(str, args),
                              "--memory", "16M", "--timeout", "5"], capture_output=True,
                             text=True, timeout=60, cwd=PACKAGE_PARENT,
                             preexec_fn=address_space_limit)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
        assert out.stderr.count("\n") == 1 and "is larger than the 0x1000000 bytes" in out.stderr


def test_cli_boot_timeout_and_bad_arguments(kernel, tmp_path):
    out = pyvt_boot(kernel("spin"), "--timeout", "0.5", "--memory", "32M", "--no-irqchip")
    assert out.returncode == 124 and out.stdout == "spinning\n"
    out = pyvt_boot(kernel("spin"), "--smp", 0)
    assert out.returncode == 2 and "--smp must be at least 1" in out.stderr
    bad = tmp_path / "bad.elf"
    bad.write_bytes(b"\x7fELF" + bytes(60))
    out = pyvt_boot(bad)
    assert out.returncode == 2 and "unknown ELF class" in out.stderr
    out = pyvt_boot(kernel("multiboot_info"), "--initrd", tmp_path / "nope")
    assert out.returncode == 2 and "cannot read initrd" in out.stderr
