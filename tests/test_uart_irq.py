"""The 16550 UART's interrupts: IER, IIR priorities, THR-empty re-arming,
MCR.OUT2 gating and ISA line 4 of the in-kernel irqchip (through the IOAPIC
and through the PIC), with real guests whose IRQ handler serves the UART the
way Linux's 8250 driver does: read IIR until it says "no interrupt"."""

import threading

import pytest
from test_kvm_interrupts import (
    APIC_BASE,
    ENABLE_LAPIC,
    IOAPIC_BASE,
    expect_out,
    irqchip_vm,
    load_idt_guest,
    mmio_write,
)

import pyvt
from pyvt import _native, exits, modes

pytestmark = pytest.mark.requires_kvm

COM1 = _native.UART_PORT
IIR_PORT = 0x500  # the handler writes each IIR it reads here
RBR_PORT = 0x502  # ... each byte it receives
MSR_PORT = 0x503  # ... each MSR it reads for a modem-status interrupt
MARK_PORT = 0x504  # the main line marks its steps here
VECTOR = 0x34

# IER bits, MCR bits
ERBFI, ETBEI, EDSSI = 0x01, 0x02, 0x08
OUT2, LOOP = 0x08, 0x10


def outb(port: int, value: int) -> str:
    return f"mov ${value:#x}, %al\n        mov ${port:#x}, %dx\n        out %al, %dx"


def mark(value: int) -> str:
    return outb(MARK_PORT, value)


def route(chip: str) -> str:
    """Delivers ISA IRQ 4 as VECTOR through ``chip``, the other one off."""
    if chip == "ioapic":  # pin 4: edge-triggered, active high, to APIC ID 0
        return "\n        ".join([
            ENABLE_LAPIC, outb(0x21, 0xFF), outb(0xA1, 0xFF),  # the PIC masked
            mmio_write(IOAPIC_BASE, 0x19), mmio_write(IOAPIC_BASE + 0x10, 0),
            mmio_write(IOAPIC_BASE, 0x18), mmio_write(IOAPIC_BASE + 0x10, VECTOR)])
    # The 8259 master at VECTOR & ~7, edge-triggered, only IRQ 4 unmasked; the
    # LAPIC passes it on through LINT0 in ExtINT mode (virtual wire).
    return "\n        ".join([
        ENABLE_LAPIC, mmio_write(APIC_BASE + 0x350, 0x700),
        outb(0x20, 0x11), outb(0x21, VECTOR & ~7), outb(0x21, 0x04), outb(0x21, 0x01),
        outb(0x21, 0xFF & ~(1 << 4)), outb(0xA1, 0xFF)])


def eoi(chip: str) -> str:
    return mmio_write(APIC_BASE + 0xB0, 0) if chip == "ioapic" else outb(0x20, 0x20)


def uart_guest(chip: str, main: str) -> bytes:
    """A long-mode guest that routes IRQ 4 through ``chip`` to a handler
    which reads IIR in a loop, reporting each value, and serves what it
    says (received data: RBR; modem status: MSR) until IIR reads "no
    interrupt"; then EOI.  The main line runs ``main`` with interrupts off
    (``sti; hlt`` waits for one), then halts."""
    return pyvt.assemble(f"""
    .globl _start
    _start:
        lidt idt_descriptor
        {route(chip)}
        {main}
        cli
        hlt
    handler:
        push %rax
        push %rdx
    next:
        mov ${COM1 + 2}, %dx
        in %dx, %al
        mov ${IIR_PORT}, %dx
        out %al, %dx
        test $1, %al
        jnz served
        and $0x0e, %al
        cmp $0x04, %al          /* received data */
        je receive
        cmp $0x0c, %al          /* FIFO character timeout */
        je receive
        test %al, %al           /* modem status */
        jnz next                /* THR empty: reading IIR acknowledged it */
        mov ${COM1 + 6}, %dx
        in %dx, %al
        mov ${MSR_PORT}, %dx
        out %al, %dx
        jmp next
    receive:
        mov ${COM1}, %dx
        in %dx, %al
        mov ${RBR_PORT}, %dx
        out %al, %dx
        jmp next
    served:
        {eoi(chip)}
        pop %rdx
        pop %rax
        iretq
    .balign 16
    idt:
        .fill {VECTOR * 2}, 8, 0
        .word handler, {modes.CODE64_SELECTOR}
        .byte 0, 0x8e
        .word 0
        .long 0, 0
    idt_end:
    idt_descriptor:
        .word idt_end - idt - 1
        .quad idt
    """, at=modes.LOAD_ADDRESS, name=f"uart_irq_{chip}_{abs(hash(main))}")


def outs(cpu, *expected) -> None:
    for port, value in expected:
        expect_out(cpu, port, value)


def halted(cpu) -> None:
    """The guest waits in hlt inside KVM (the in-kernel LAPIC): the run times out."""
    exit = cpu.run(timeout=2)
    assert isinstance(exit, exits.Timeout), exit


CHIPS = pytest.mark.parametrize("chip", ["ioapic", "pic"])

#: Waits for one interrupt; interrupts are off again after it (iretq
#: restored the IF=1 that sti; hlt had).
WAIT = "sti\n        hlt\n        cli"


@CHIPS
def test_a_byte_fed_from_another_thread_interrupts_the_halted_guest(kvm, chip):
    main = "\n        ".join([outb(COM1 + 1, ERBFI), outb(COM1 + 4, OUT2), mark(1), WAIT, mark(2)])
    with irqchip_vm(kvm) as vm:
        assert vm.console.irq == 4
        cpu = load_idt_guest(vm, uart_guest(chip, main))
        outs(cpu, (MARK_PORT, 1))
        halted(cpu)
        # The feeding thread raises the line while the vCPU waits in KVM_RUN.
        feeder = threading.Timer(0.2, vm.console.feed, (b"Z",))
        feeder.start()
        try:
            outs(cpu, (IIR_PORT, 0x04), (RBR_PORT, ord("Z")), (IIR_PORT, 0x01), (MARK_PORT, 2))
        finally:
            feeder.join()
        assert vm.console.irq_level == 0


@CHIPS
def test_every_new_byte_is_a_new_edge(kvm, chip):
    """The line falls when the handler empties the FIFO: the next byte
    raises it again, and the edge-triggered pin takes it."""
    main = "\n        ".join([outb(COM1 + 1, ERBFI), outb(COM1 + 4, OUT2), mark(1),
                             WAIT, mark(2), WAIT, mark(3)])
    with irqchip_vm(kvm) as vm:
        cpu = load_idt_guest(vm, uart_guest(chip, main))
        outs(cpu, (MARK_PORT, 1))
        halted(cpu)
        for byte, step in ((b"a", 2), (b"b", 3)):
            vm.console.feed(byte)
            assert vm.console.irq_level == 1
            outs(cpu, (IIR_PORT, 0x04), (RBR_PORT, byte[0]), (IIR_PORT, 0x01), (MARK_PORT, step))
            assert vm.console.irq_level == 0


@CHIPS
def test_thr_empty_interrupts_when_etbei_is_enabled_and_after_each_write(kvm, chip):
    main = "\n        ".join([
        outb(COM1 + 4, OUT2), outb(COM1 + 1, ETBEI), WAIT, mark(1),
        # IIR took the interrupt back; a THR write empties THR again: a new one.
        outb(COM1, ord("x")), WAIT, mark(2),
        # ETBEI off and on again re-arms it though THR was not written.
        outb(COM1 + 1, 0), outb(COM1 + 1, ETBEI), WAIT, mark(3)])
    with irqchip_vm(kvm) as vm:
        cpu = load_idt_guest(vm, uart_guest(chip, main))
        outs(cpu, (IIR_PORT, 0x02), (IIR_PORT, 0x01), (MARK_PORT, 1),
             (IIR_PORT, 0x02), (IIR_PORT, 0x01), (MARK_PORT, 2),
             (IIR_PORT, 0x02), (IIR_PORT, 0x01), (MARK_PORT, 3))
        assert vm.console.output == b"x"


def test_coalesced_thr_writes_raise_the_interrupt_when_the_ring_is_replayed(kvm):
    """THR writes KVM queued without an exit reach the UART at the next
    exit (here the LSR read a driver does), and raise THR empty then."""
    main = "\n        ".join([
        outb(COM1, ord("a")),  # the first write registers the coalesced zone
        outb(COM1 + 4, OUT2), outb(COM1 + 1, ETBEI), WAIT, mark(1),
        outb(COM1, ord("b")), outb(COM1, ord("c")),  # queued in the ring
        f"mov ${COM1 + 5:#x}, %dx\n        in %dx, %al", WAIT, mark(2)])
    with irqchip_vm(kvm) as vm:
        cpu = load_idt_guest(vm, uart_guest("ioapic", main))
        outs(cpu, (IIR_PORT, 0x02), (IIR_PORT, 0x01), (MARK_PORT, 1),
             (IIR_PORT, 0x02), (IIR_PORT, 0x01), (MARK_PORT, 2))
        assert vm.console.output == b"abc"
        if not vm.console.coalesced:
            pytest.skip("KVM refused the coalesced zone: the writes exited one by one")


def test_iir_reports_received_data_before_thr_empty_before_modem_status(kvm):
    """All three pending at once (a byte, THR empty, a modem-status change
    from loopback), FIFO on with trigger level 8: one byte is a character
    timeout (0xcc), then THR empty (0xc2), then modem status (0xc0)."""
    main = "\n        ".join([
        outb(COM1 + 2, 0x81),  # FIFO on, trigger level 8
        outb(COM1 + 4, OUT2 | LOOP), outb(COM1 + 4, OUT2),  # CTS and DSR changed
        mark(1), outb(COM1 + 1, ERBFI | ETBEI | EDSSI), WAIT, mark(2)])
    with irqchip_vm(kvm) as vm:
        vm.console.feed(b"!")
        cpu = load_idt_guest(vm, uart_guest("ioapic", main))
        outs(cpu, (MARK_PORT, 1),
             (IIR_PORT, 0xCC), (RBR_PORT, ord("!")), (IIR_PORT, 0xC2),
             (IIR_PORT, 0xC0), (MSR_PORT, 0xB3), (IIR_PORT, 0xC1), (MARK_PORT, 2))


@CHIPS
def test_no_interrupt_reaches_the_guest_without_out2(kvm, chip):
    """Without MCR.OUT2 the guest sees the byte (LSR.DR) but takes no
    interrupt; setting OUT2 lets the pending one through at once."""
    main = "\n        ".join([
        outb(COM1 + 1, ERBFI), mark(1), "sti",
        f"mov ${COM1 + 5:#x}, %dx\n    1:  in %dx, %al\n        test $1, %al\n        jz 1b",
        mark(2), outb(COM1 + 4, OUT2), "nop", mark(3)])
    with irqchip_vm(kvm) as vm:
        cpu = load_idt_guest(vm, uart_guest(chip, main))
        outs(cpu, (MARK_PORT, 1))
        vm.console.feed(b"q")
        assert vm.console.irq_level == 0
        outs(cpu, (MARK_PORT, 2), (IIR_PORT, 0x04), (RBR_PORT, ord("q")), (IIR_PORT, 0x01),
             (MARK_PORT, 3))


def test_state_carries_the_pending_interrupt_and_line_level(kvm):
    main = "\n        ".join([outb(COM1 + 4, OUT2), outb(COM1 + 1, ETBEI), mark(1)])
    with irqchip_vm(kvm) as vm:
        cpu = load_idt_guest(vm, uart_guest("ioapic", main))
        outs(cpu, (MARK_PORT, 1))  # THR empty pending, interrupts off: never taken
        assert vm.console.irq_level == 1
        state = vm.console.save_state()
        with pyvt.Vm("1M", backend=kvm.path) as other:
            other.console.load_state(state)
            assert other.console.irq_level == 1
            assert other.console.save_state()["registers"] == state["registers"]
            registers = bytearray(state["registers"])
            # The line level: after 7 registers, thr_ipending, the u32 rx_count,
            # the 4096-byte FIFO and msr_delta (struct pvt_uart_state).
            registers[8 + 4 + 4096 + 1] = 0
            with pytest.raises(pyvt.DeviceStateError, match="IRQ line level"):
                other.console.load_state({**state, "registers": bytes(registers)})


def test_without_an_irqchip_a_polling_guest_still_reads_its_input(vm):
    """No in-kernel irqchip: the line level is kept, KVM_IRQ_LINE has no
    chip to reach, and a guest that polls LSR reads the byte."""
    code = pyvt.assemble("\n        ".join([
        ".globl _start", "_start:", outb(COM1 + 1, ERBFI), outb(COM1 + 4, OUT2), mark(1),
        f"mov ${COM1 + 5:#x}, %dx\n    1:  in %dx, %al\n        test $1, %al\n        jz 1b",
        f"mov ${COM1:#x}, %dx\n        in %dx, %al\n        mov ${RBR_PORT}, %dx\n        out %al, %dx",
        "hlt"]), at=modes.LOAD_ADDRESS, name="uart_poll_no_irqchip")
    cpu = load_idt_guest(vm, code)
    outs(cpu, (MARK_PORT, 1))
    vm.console.feed(b"p")
    assert vm.console.irq_level == 1
    outs(cpu, (RBR_PORT, ord("p")))
    assert vm.console.irq_level == 0
