"""The PCI bus from a real guest (issue 15, part 2): a long-mode guest scans
bus 0 through 0xcf8/0xcfc and through ECAM, sizes a BAR, reads and writes a
Python device's memory and I/O BARs, walks the capability list to MSI-X,
takes MSI-X interrupts (KVM_SIGNAL_MSI and an irqfd eventfd, masked and
unmasked) and INTx through the IOAPIC (KVM_IRQ_LINE, and an irqfd whose
resample eventfd reports the guest's EOI), and powers off through the ACPI
PM1a control block."""

import os
import struct

import pytest

import pyvt
from pyvt import exits, modes, pci

pytestmark = [pytest.mark.requires_kvm, pytest.mark.requires_cap(
    "IRQCHIP", "SIGNAL_MSI", "IRQ_ROUTING", "IRQFD", "IRQFD_RESAMPLE")]

CODE = modes.LOAD_ADDRESS
RESULTS = 0x6000
COUNTERS = 0x6300  # the interrupt handlers count here, one dword per vector
APIC_BASE = 0xFEE00000
IOAPIC_BASE = 0xFEC00000
MSI_VECTOR, EVENTFD_VECTOR, INTX_VECTOR = 0x40, 0x42, 0x41
SCRATCH, NOTIFY, INTX, EVENT, INTX_EVENT = 0x0, 0x4, 0x8, 0xC, 0x10  # the probe's BAR 0 registers
TABLE, PBA = 0x800, 0xC00
IO_ANSWER = 0xA55A


class Probe(pci.PciDevice):
    """A device for the guest to find: BAR 0 (4 KiB) holds a scratch
    register, four doorbells (MSI-X vector, INTx level, MSI-X vector
    through its eventfd, INTx through its irqfd) and the MSI-X table and
    PBA; BAR 4 is 32 I/O ports that read IO_ANSWER."""

    def __init__(self):
        super().__init__(0x1234, 0x11E8, 0xFF0000, revision=3)
        self.add_bar(0, 0x1000)
        self.add_bar(4, 32, kind="io")
        self.enable_msix(2, 0, TABLE, PBA)
        self.scratch = 0
        self.moves = []

    def on_bar_read(self, index, offset, size):
        if index == 4:
            return IO_ANSWER
        return self.scratch if offset == SCRATCH else 0

    def on_bar_write(self, index, offset, size, value):
        if offset == SCRATCH:
            self.scratch = value
        elif offset == NOTIFY:
            self.msix.notify(value)
        elif offset == INTX:
            self.set_intx(bool(value))
        elif offset == EVENT:
            os.eventfd_write(self.msix.eventfd(value), 1)  # as a native worker would
        elif offset == INTX_EVENT:
            os.eventfd_write(self.intx_eventfd(), 1)

    def on_bar_moved(self, index, old_address, new_address):
        self.moves.append((index, old_address, new_address))


def config_address(slot: int, offset: int) -> int:
    return 0x80000000 | slot << 11 | offset & 0xFC


def _guest(slot: int, gsi: int) -> bytes:
    """The whole walk; each step leaves its result at RESULTS + n."""
    def cf8(offset):  # select (slot, offset) for 0xcfc
        return f"mov ${config_address(slot, offset):#x}, %eax\n    mov $0xcf8, %dx\n    out %eax, %dx"

    def cf8_ebx(plus):  # select offset %ebx + plus (same dword); %dx: its data port
        return f"""mov %ebx, %eax
        and $0xfc, %eax
        or ${config_address(slot, 0):#x}, %eax
        mov $0xcf8, %dx
        out %eax, %dx
        mov %ebx, %edx
        and $3, %edx
        add ${0xCFC + plus:#x}, %edx"""

    def wait_for_interrupt():
        return "sti\n    hlt\n    cli"

    gates = "".join(f"""
        .org idt + {vector} * 16
        .word handler_{vector:x}, {modes.CODE64_SELECTOR}
        .byte 0, 0x8e
        .word 0
        .long 0, 0""" for vector in (MSI_VECTOR, INTX_VECTOR, EVENTFD_VECTOR))
    handlers = "".join(f"""
    handler_{vector:x}:
        push %rax
        push %rdx
        {deassert}
        incl {COUNTERS + 4 * (vector - MSI_VECTOR)}
        mov ${APIC_BASE + 0xB0:#x}, %edx
        movl $0, (%rdx)             /* LAPIC EOI */
        pop %rdx
        pop %rax
        iretq""" for vector, deassert in (
            (MSI_VECTOR, ""), (EVENTFD_VECTOR, ""),
            (INTX_VECTOR, f"movl $0, {INTX}(%r12)  /* the device lowers INTx */")))
    return pyvt.assemble(f"""
    .globl _start
    _start:
        lidt idt_descriptor
        mov ${APIC_BASE + 0xF0:#x}, %edx
        movl $0x1ff, (%rdx)         /* LAPIC software-enabled */

        /* 1. every slot's vendor/device through 0xcf8/0xcfc */
        xor %ebx, %ebx
    1:  mov %ebx, %eax
        shl $11, %eax
        or $0x80000000, %eax
        mov $0xcf8, %dx
        out %eax, %dx
        mov $0xcfc, %dx
        in %dx, %eax
        mov %eax, {RESULTS}(,%rbx,4)
        inc %ebx
        cmp $32, %ebx
        jb 1b

        /* 2. the same through ECAM */
        xor %ebx, %ebx
    2:  mov %rbx, %rax
        shl $15, %rax
        mov ${pci.ECAM_BASE:#x}, %ecx
        add %rcx, %rax
        mov (%rax), %eax
        mov %eax, {RESULTS + 0x80}(,%rbx,4)
        inc %ebx
        cmp $32, %ebx
        jb 2b

        /* 3. size BAR 0 as Linux does: decoding off, all ones, read, restore */
        {cf8(0x04)}
        mov $0xcfc, %dx
        xor %eax, %eax
        out %ax, %dx                /* command: decoders off */
        {cf8(0x10)}
        mov $0xcfc, %dx
        in %dx, %eax
        mov %eax, %r12d             /* the BAR as pyvt assigned it */
        mov $0xffffffff, %eax
        out %eax, %dx
        in %dx, %eax
        mov %eax, {RESULTS + 0x100}
        mov %r12d, %eax
        out %eax, %dx
        {cf8(0x04)}
        mov $0xcfc, %dx
        mov $3, %ax
        out %ax, %dx                /* command: I/O and memory decoders on */
        {cf8(0x00)}
        mov $0xcfe, %dx
        in %dx, %ax                 /* a word at offset 2 through 0xcfe */
        mov %ax, {RESULTS + 0x104}
        mov ${pci.ECAM_BASE + (slot << 15) + 0x08:#x}, %eax
        movb (%rax), %al            /* a byte through ECAM: the revision */
        mov %al, {RESULTS + 0x106}

        /* 4. the memory and I/O BARs */
        and $0xfffffff0, %r12d
        movl $0x12345678, {SCRATCH}(%r12)
        mov {SCRATCH}(%r12), %eax
        mov %eax, {RESULTS + 0x108}
        {cf8(0x20)}
        mov $0xcfc, %dx
        in %dx, %eax
        and $0xfffc, %eax
        mov %eax, %edx
        in %dx, %ax
        mov %ax, {RESULTS + 0x10c}

        /* 5. walk the capability list to MSI-X (ID 0x11) */
        {cf8(0x34)}
        mov $0xcfc, %dx
        in %dx, %al
        movzbl %al, %ebx
    3:  {cf8_ebx(0)}
        in %dx, %al                 /* the capability's ID */
        cmp $0x11, %al
        je 4f
        inc %edx
        in %dx, %al                 /* its next pointer */
        movzbl %al, %ebx
        test %ebx, %ebx
        jnz 3b
        hlt                         /* no MSI-X: the host sees no PowerOff */
    4:  mov %ebx, {RESULTS + 0x110}

        /* MSI-X entries 0 and 1 (masked still), then enable MSI-X */
        movl ${APIC_BASE:#x}, {TABLE}(%r12)
        movl $0, {TABLE + 4}(%r12)
        movl ${MSI_VECTOR:#x}, {TABLE + 8}(%r12)
        movl ${APIC_BASE:#x}, {TABLE + 16}(%r12)
        movl $0, {TABLE + 20}(%r12)
        movl ${EVENTFD_VECTOR:#x}, {TABLE + 24}(%r12)
        {cf8_ebx(2)}                /* message control: the capability + 2 */
        mov $0x8000, %ax
        out %ax, %dx

        /* 6. vector 0 while masked: pending; unmasked: delivered */
        movl $0, {NOTIFY}(%r12)
        mov {PBA}(%r12), %eax
        mov %eax, {RESULTS + 0x114}
        mov {COUNTERS}, %eax
        mov %eax, {RESULTS + 0x118}     /* nothing delivered yet */
        movl $0, {TABLE + 12}(%r12)     /* unmask */
        {wait_for_interrupt()}
        mov {PBA}(%r12), %eax
        mov %eax, {RESULTS + 0x11c}
        movl $0, {NOTIFY}(%r12)         /* unmasked: at once */
        {wait_for_interrupt()}

        /* 7. vector 1 through its eventfd: pending while masked, then delivered */
        movl $1, {EVENT}(%r12)
        mov {PBA}(%r12), %eax
        mov %eax, {RESULTS + 0x120}
        movl $0, {TABLE + 28}(%r12)     /* unmask: the irqfd delivers it */
        {wait_for_interrupt()}
        movl $1, {EVENT}(%r12)          /* unmasked: through KVM alone */
        {wait_for_interrupt()}

        /* 8. INTx: IOAPIC pin {gsi} -> vector INTX_VECTOR, level-triggered */
        mov ${IOAPIC_BASE:#x}, %edx
        movl ${0x11 + 2 * gsi:#x}, (%rdx)
        movl $0, 0x10(%rdx)
        movl ${0x10 + 2 * gsi:#x}, (%rdx)
        movl ${INTX_VECTOR | 1 << 15:#x}, 0x10(%rdx)
        movl $1, {INTX}(%r12)           /* the device raises INTx */
        {wait_for_interrupt()}
        movl $1, {INTX_EVENT}(%r12)     /* again, through the irqfd: the EOI lowers it */
        {wait_for_interrupt()}

        /* 9. power off: SLP_TYP 0 (\\_S5) with SLP_EN */
        mov $0x604, %dx
        mov $0x2000, %ax
        out %ax, %dx
        hlt
    {handlers}
    .balign 16
    idt:
        {gates}
        .org idt + 256 * 16
    idt_end:
    idt_descriptor:
        .word idt_end - idt - 1
        .quad idt
    """, at=CODE, name="pci_walk")


def test_a_guest_finds_sizes_uses_and_interrupts_through_a_python_device(kvm):
    with pyvt.Vm("16M", backend=kvm.path) as vm:
        vm.fd.create_irqchip()
        probe = Probe()
        slot = vm.pci.add(probe)
        assert slot == 1 and vm.pci.find(1) is probe and vm.pci.find(0) is vm.pci.host_bridge
        bar0 = probe.bars[0].address
        assert pci.MMIO32_WINDOW[0] <= bar0 < pci.MMIO32_WINDOW[1] and bar0 % 0x1000 == 0
        io = probe.bars[4].address
        assert pci.IO_WINDOW[0] <= io < pci.IO_WINDOW[1] and io % 32 == 0
        gsi = probe.intx_gsi
        assert gsi == pci.intx_gsi(1, 1) == 17 and probe.config[pci.INTERRUPT_LINE] == 17
        vm.memory.write(CODE, _guest(slot, gsi))
        cpu = vm.vcpu(0, mode="long")
        cpu.regs.rip = CODE

        exit = cpu.run(timeout=120)

        assert isinstance(exit, exits.PowerOff), exit
        assert (exit.source, exit.port) == ("acpi_pm1", 0x604)
        ids = struct.unpack("<32I", vm.memory.read(RESULTS, 128))
        assert ids[0] == 0x29C08086 and ids[1] == 0x11E81234
        assert set(ids[2:]) == {0xFFFFFFFF}
        assert struct.unpack("<32I", vm.memory.read(RESULTS + 0x80, 128)) == ids
        r = lambda offset, fmt="<I": struct.unpack_from(fmt, vm.memory.read(RESULTS + offset, 8))[0]  # noqa: E731
        assert r(0x100) == 0xFFFFF000  # 4 KiB, 32-bit, not prefetchable
        assert r(0x104, "<H") == 0x11E8 and r(0x106, "<B") == 3
        assert r(0x108) == 0x12345678 and probe.scratch == 0x12345678
        assert r(0x10C, "<H") == IO_ANSWER
        assert r(0x110) == probe.msix.cap_offset
        assert r(0x114) == 1 and r(0x118) == 0  # masked: pending, not sent
        assert r(0x11C) == 0  # unmasking sent it and cleared the bit
        assert r(0x120) == 2  # the eventfd's vector, masked: pending
        counts = struct.unpack("<III", vm.memory.read(COUNTERS, 12))
        assert counts == (2, 2, 2)  # MSI_VECTOR, INTX_VECTOR, EVENTFD_VECTOR
        assert os.eventfd_read(probe.intx_resample_eventfd) == 1  # KVM saw the EOI
        # Sizing with decoding off unmapped BAR 0 and the restore mapped it back.
        assert (0, bar0, None) in probe.moves and probe.moves[-1] in ((0, None, bar0), (4, None, io))
        assert probe.bars[0].address == bar0 and probe.bars[4].address == io
        assert not probe._intx_asserted and probe.msix.enabled
        assert vm.acpi_pm1.control & 0x1C00 == 0  # SLP_TYP 0, SLP_EN not kept


def test_power_off_ends_pyvt_run_with_status_0(tmp_path):
    source = tmp_path / "off.S"
    source.write_text(".code64\nmov $0x604, %dx\nmov $0x2000, %ax\nout %ax, %dx\nhlt\n")
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "pyvt", "run", str(source)],
                         capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(pyvt.__file__)),
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(
                             [os.path.dirname(os.path.dirname(pyvt.__file__))]
                             + os.environ.get("PYTHONPATH", "").split(os.pathsep))})
    assert out.returncode == 0, out.stderr
    assert "PowerOff(source='acpi_pm1', port=0x604" in out.stdout + out.stderr
