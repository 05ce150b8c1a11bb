"""Interrupts, NMI/SMI, MSI and GSI routing, translation, the clocks, nested
state and sregs2 (issue 12, section A): the thin-layer ioctls and
cpu.interrupt / cpu.nmi / cpu.translate / vm.signal_msi / vm.gsi_routing,
with real guests wherever the guest can see the effect."""

import errno
import os
import struct

import pytest

import pyvt
from pyvt import exits, modes
from pyvt._kvm import lib
from pyvt.kvm import struct_bytes
from pyvt.gsi_routes import IrqchipRoute, MsiRoute, irqchip_routes, routing_table

pytestmark = pytest.mark.requires_kvm

CODE = modes.LOAD_ADDRESS
HANDLER_PORT = 0x500  # the handler writes its vector here
DONE_PORT = 0x501  # the main line writes here once the handler returned
APIC_BASE = 0xFEE00000
IOAPIC_BASE = 0xFEC00000


@pytest.fixture
def interrupts(vm):
    """Skips where the backend lacks KVM_INTERRUPT (pyvt.ko), which no
    capability announces."""
    with pyvt.Vm("1M", backend=vm.backend, pc_devices=False) as probe:
        if not probe.vcpu(0).fd.has_interrupt():
            pytest.skip(f"{vm.backend} does not implement KVM_INTERRUPT")


@pytest.fixture
def translation(vm):
    """Skips where the backend lacks KVM_TRANSLATE (pyvt.ko), which no
    capability announces."""
    with pyvt.Vm("1M", backend=vm.backend, pc_devices=False) as probe:
        try:
            probe.vcpu(0).fd.translate(0)
        except pyvt.KvmError as e:
            if e.errno == errno.ENOTTY:
                pytest.skip(f"{vm.backend} does not implement KVM_TRANSLATE")
            raise


def idt_guest(vector: int, prologue: str = "", wait: str = "sti\n    hlt") -> bytes:
    """A long-mode guest with a one-gate IDT (``vector``, whose handler
    writes ``vector`` to HANDLER_PORT, then EOIs the LAPIC if ``prologue``
    enabled it, and returns); the main line runs ``prologue``, then ``wait``
    for the interrupt, then writes 0xd0 to DONE_PORT and halts.  (Long mode:
    this host's PVM cannot emulate a 32-bit iret.)"""
    eoi = mmio_write(APIC_BASE + 0xB0, 0) if prologue else ""
    return pyvt.assemble(f"""
    .globl _start
    _start:
        lidt idt_descriptor
        {prologue}
        {wait}
        mov $0xd0, %al
        mov ${DONE_PORT}, %dx
        out %al, %dx
        hlt
    handler:
        push %rax
        push %rdx
        mov ${vector}, %al
        mov ${HANDLER_PORT}, %dx
        out %al, %dx
        {eoi}
        pop %rdx
        pop %rax
        iretq
    .balign 16
    idt:
        .fill {vector * 2}, 8, 0
        .word handler, {modes.CODE64_SELECTOR}
        .byte 0, 0x8e              /* present, ring 0, 64-bit interrupt gate */
        .word 0                    /* handler < 64 KiB: offset bits 16-63 are 0 */
        .long 0, 0
    idt_end:
    idt_descriptor:
        .word idt_end - idt - 1
        .quad idt
    """, at=CODE, name=f"idt_{vector}")


def mmio_write(address: int, value: int) -> str:
    """Assembly storing the 32-bit ``value`` at physical ``address`` (< 4 GiB,
    identity-mapped by pyvt's long mode)."""
    return f"mov ${address:#x}, %edx\n        movl ${value:#x}, (%rdx)"


def load_idt_guest(vm, image: bytes) -> pyvt.Vcpu:
    vm.memory.write(CODE, image)
    cpu = vm.vcpu(0, mode="long")
    cpu.regs.rip = CODE
    return cpu


def expect_out(cpu, port: int, value: int) -> None:
    exit = cpu.run(timeout=30)
    assert isinstance(exit, exits.Io) and exit.direction == "out", exit
    assert (exit.port, exit.data) == (port, bytes([value])), exit


def expect_handler_then_done(cpu, vector: int) -> None:
    expect_out(cpu, HANDLER_PORT, vector)
    expect_out(cpu, DONE_PORT, 0xD0)


# -- KVM_INTERRUPT and KVM_NMI, without the in-kernel irqchip ----------------


def test_interrupt_reaches_the_idt_handler_of_a_halted_guest(vm, interrupts):
    cpu = load_idt_guest(vm, idt_guest(0x30))
    exit = cpu.run(timeout=30)
    assert isinstance(exit, exits.Hlt), exit  # sti; hlt: waiting, interruptible
    assert cpu.fd.run_struct.ready_for_interrupt_injection
    cpu.interrupt(0x30)
    expect_handler_then_done(cpu, 0x30)


def test_interrupt_raised_before_the_guest_can_take_it_waits_for_its_window(vm, interrupts):
    # Raised while IF is still 0 (before the guest's sti): KVM must not get
    # it yet; run() asks for the interrupt window and hands it over there.
    cpu = load_idt_guest(vm, idt_guest(0x41))
    cpu.interrupt(0x41)
    assert not cpu.fd.run_struct.ready_for_interrupt_injection
    assert cpu.fd.run_struct.request_interrupt_window
    expect_handler_then_done(cpu, 0x41)
    assert not cpu.fd.run_struct.request_interrupt_window


def test_interrupts_raised_together_arrive_one_window_each_in_order(vm, interrupts):
    # Two gates (0x40, 0x48); each handler reports its vector and counts;
    # the main line spins with interrupts on until it has seen both.
    gates = "".join(f"""
        .org idt + {vector * 16}
        .word handler_{vector:x}, {modes.CODE64_SELECTOR}
        .byte 0, 0x8e
        .word 0
        .long 0, 0""" for vector in (0x40, 0x48))
    handlers = "".join(f"""
    handler_{vector:x}:
        push %rax
        push %rdx
        mov ${vector}, %al
        mov ${HANDLER_PORT}, %dx
        out %al, %dx
        incb seen(%rip)
        pop %rdx
        pop %rax
        iretq""" for vector in (0x40, 0x48))
    image = pyvt.assemble(f"""
        lidt idt_descriptor(%rip)
        sti
    1:  cmpb $2, seen(%rip)
        jne 1b
        mov $0xd0, %al
        mov ${DONE_PORT}, %dx
        out %al, %dx
        hlt
    {handlers}
    seen: .byte 0
    .balign 16
    idt:
    {gates}
    idt_end:
    idt_descriptor:
        .word idt_end - idt - 1
        .quad idt
    """, at=CODE)
    cpu = load_idt_guest(vm, image)
    cpu.interrupt(0x48)
    cpu.interrupt(0x40)
    expect_out(cpu, HANDLER_PORT, 0x48)
    expect_out(cpu, HANDLER_PORT, 0x40)
    expect_out(cpu, DONE_PORT, 0xD0)


def test_interrupt_is_not_taken_while_the_guest_has_interrupts_off(vm, interrupts):
    # The guest never sets IF: the vector stays queued, the guest runs on.
    cpu = load_idt_guest(vm, idt_guest(0x42, wait="nop"))
    cpu.interrupt(0x42)
    expect_out(cpu, DONE_PORT, 0xD0)
    assert isinstance(cpu.run(timeout=30), exits.Hlt)
    assert list(cpu._queued_vectors) == [0x42]        # not dropped: still queued
    assert cpu.fd.run_struct.request_interrupt_window  # pyvt still waits to hand it over


@pytest.mark.requires_cap("USER_NMI")
def test_nmi_reaches_vector_2_with_interrupts_off(vm):
    cpu = load_idt_guest(vm, idt_guest(2, wait="hlt"))  # IF stays 0
    exit = cpu.run(timeout=30)
    assert isinstance(exit, exits.Hlt), exit
    cpu.nmi()
    expect_handler_then_done(cpu, 2)


def test_interrupt_arguments_and_the_irqchip_are_checked(kvm):
    with pyvt.Vm("16M", backend=kvm.path) as vm:
        cpu = vm.vcpu(0, "protected")
        for bad in (256, -1, "0x30", True):
            with pytest.raises(pyvt.ArgumentError):
                cpu.interrupt(bad)
        with pytest.raises(pyvt.ArgumentError, match="exceptions"):
            cpu.interrupt(14)
        with pytest.raises(pyvt.ArgumentError):
            cpu.fd.interrupt(256)
    with pyvt.Vm("16M", backend=kvm.path) as vm:
        if not kvm.check_extension("IRQCHIP"):
            pytest.skip(f"{kvm.path} lacks KVM_CAP_IRQCHIP")
        vm.fd.create_irqchip()
        cpu = vm.vcpu(0, "protected")
        with pytest.raises(pyvt.Error, match="in-kernel irqchip"):
            cpu.interrupt(0x30)
        with pytest.raises(pyvt.KvmError, match="in-kernel irqchip") as caught:
            cpu.fd.interrupt(0x30)
        assert caught.value.errno == 6  # ENXIO


# -- MSI and GSI routing, with the in-kernel irqchip -------------------------

# Software-enables the LAPIC (spurious-interrupt vector register, bit 8).
ENABLE_LAPIC = mmio_write(APIC_BASE + 0xF0, 0x1FF)


def irqchip_vm(kvm) -> pyvt.Vm:
    if not kvm.check_extension("IRQCHIP"):
        pytest.skip(f"{kvm.path} lacks KVM_CAP_IRQCHIP")
    vm = pyvt.Vm("16M", backend=kvm.path)
    vm.fd.create_irqchip()  # before the vCPU, which gets a LAPIC
    return vm


def run_to_lapic_wait(vm, image: bytes) -> pyvt.Vcpu:
    """Loads ``image``, runs it until it waits in hlt (the in-kernel LAPIC
    makes hlt wait inside KVM: the run times out)."""
    cpu = load_idt_guest(vm, image)
    exit = cpu.run(timeout=2)
    assert isinstance(exit, exits.Timeout), exit
    return cpu


@pytest.mark.requires_cap("SIGNAL_MSI")
def test_signal_msi_reaches_the_lapic(kvm):
    with irqchip_vm(kvm) as vm:
        cpu = run_to_lapic_wait(vm, idt_guest(0x51, prologue=ENABLE_LAPIC))
        assert vm.signal_msi(APIC_BASE, 0x51) == 1  # APIC ID 0 took it
        expect_handler_then_done(cpu, 0x51)


@pytest.mark.requires_cap("IRQ_ROUTING", "IRQFD")
def test_msi_route_sends_its_message_when_the_gsi_fires(kvm):
    with irqchip_vm(kvm) as vm:
        cpu = run_to_lapic_wait(vm, idt_guest(0x62, prologue=ENABLE_LAPIC))
        vm.gsi_routing = irqchip_routes() + [MsiRoute(gsi=30, address=APIC_BASE, data=0x62)]
        assert vm.gsi_routing[-1] == MsiRoute(30, APIC_BASE, 0x62)
        event = os.eventfd(0)
        try:
            vm.fd.register_irqfd(event, 30)
            os.eventfd_write(event, 1)
            expect_handler_then_done(cpu, 0x62)
        finally:
            vm.fd.unregister_irqfd(event, 30)
            os.close(event)


def ioapic_guest(pin: int, vector: int) -> bytes:
    """Enables the LAPIC and routes IOAPIC ``pin`` to ``vector``, level-triggered,
    to APIC ID 0; the handler's LAPIC EOI ends the level interrupt."""
    low, high = 0x10 + 2 * pin, 0x11 + 2 * pin
    return idt_guest(vector, prologue="\n        ".join([
        ENABLE_LAPIC,
        mmio_write(IOAPIC_BASE, high), mmio_write(IOAPIC_BASE + 0x10, 0),
        mmio_write(IOAPIC_BASE, low), mmio_write(IOAPIC_BASE + 0x10, vector | 1 << 15),
    ]))


@pytest.mark.requires_cap("IRQ_ROUTING", "IRQFD", "IRQFD_RESAMPLE")
def test_irqfd_resample_is_signalled_when_the_guest_eois(kvm):
    pin, gsi = 5, 5
    with irqchip_vm(kvm) as vm:
        cpu = run_to_lapic_wait(vm, ioapic_guest(pin, 0x73))
        # Only the IOAPIC (not the PIC) gets this GSI: an irqchip route.
        vm.gsi_routing = [IrqchipRoute(gsi, lib.KVM_IRQCHIP_IOAPIC, pin)]
        trigger, resample = os.eventfd(0), os.eventfd(0, os.EFD_NONBLOCK)
        try:
            vm.fd.register_irqfd(trigger, gsi, resamplefd=resample)
            with pytest.raises(BlockingIOError):
                os.eventfd_read(resample)  # nothing EOI'd yet
            os.eventfd_write(trigger, 1)
            expect_handler_then_done(cpu, 0x73)
            assert os.eventfd_read(resample) == 1  # the guest's EOI
        finally:
            vm.fd.unregister_irqfd(trigger, gsi)
            os.close(trigger)
            os.close(resample)


def test_irqfd_keeps_its_old_signature_and_checks_resample(kvm):
    """irqfd(deassign=) still works, deprecated, until the next release."""
    with irqchip_vm(kvm) as vm:
        event = os.eventfd(0)
        try:
            with pytest.warns(DeprecationWarning, match="register_irqfd"):
                vm.fd.irqfd(event, 4)
            with pytest.warns(DeprecationWarning, match="unregister_irqfd"):
                vm.fd.irqfd(event, 4, deassign=True)
            vm.fd.register_irqfd(event, 4)  # it was unregistered: free again
            vm.fd.unregister_irqfd(event, 4)
            with pytest.raises(pyvt.ArgumentError, match="resamplefd"), \
                    pytest.warns(DeprecationWarning):
                vm.fd.irqfd(event, 4, deassign=True, resamplefd=event)
            with pytest.raises(pyvt.ArgumentError):
                vm.fd.register_irqfd(event, 4, resamplefd=-1)
        finally:
            os.close(event)


def test_irqfd_register_unregister_pair(kvm):
    with irqchip_vm(kvm) as vm:
        event = os.eventfd(0)
        try:
            vm.fd.register_irqfd(event, 4)
            with pytest.raises(pyvt.KvmError):  # KVM refuses the same eventfd twice
                vm.fd.register_irqfd(event, 4)
            vm.fd.unregister_irqfd(event, 4)
            vm.fd.register_irqfd(event, 4)  # free again
            vm.fd.unregister_irqfd(event, 4)
        finally:
            os.close(event)


def test_msi_and_routing_need_the_irqchip_and_valid_routes(kvm):
    with pyvt.Vm("16M", backend=kvm.path) as vm:
        with pytest.raises(pyvt.Error, match="create_irqchip"):
            vm.signal_msi(APIC_BASE, 0x30)
        with pytest.raises(pyvt.Error, match="create_irqchip"):
            vm.gsi_routing = irqchip_routes()
    for bad, error in [
        ([IrqchipRoute(1, 7, 0)], pyvt.ArgumentError),  # no such irqchip
        ([IrqchipRoute(1, lib.KVM_IRQCHIP_PIC_MASTER, 8)], pyvt.ArgumentError),
        ([MsiRoute(1, 1 << 64, 0)], pyvt.ArgumentError),
        ([MsiRoute(5000, APIC_BASE, 0)], pyvt.ArgumentError),  # beyond max_gsi
        ([(1, 2, 3)], pyvt.ArgumentTypeError),
        (42, pyvt.ArgumentTypeError),
    ]:
        with pytest.raises(error):
            routing_table(bad, max_gsi=1024)
    table = routing_table([MsiRoute(3, 0x1_FEE0_1000, 0x41, devid=9)])
    entry = table.entries[0]
    assert (table.nr, entry.gsi, entry.type) == (1, 3, lib.KVM_IRQ_ROUTING_MSI)
    assert (entry.u.msi.address_hi, entry.u.msi.address_lo, entry.u.msi.data,
            entry.u.msi.devid) == (1, 0xFEE01000, 0x41, 9)
    # A cffi entry passes through unchanged.
    assert routing_table([entry]).entries[0].u.msi.data == 0x41


# -- translation ---------------------------------------------------------------

MAPPED_VA = 0x1234_5678_9000  # PML4 slot 36: outside pyvt's identity map (slot 0)
MAPPED_PA = 0x8000


def add_4k_mapping(vm, va: int, pa: int, tables: int = 0x20000) -> None:
    """Maps one 4 KiB page va -> pa: a PDPT, page directory and page table
    at ``tables``, hooked into pyvt's PML4 (read-only)."""
    rw = modes.PTE_PRESENT | modes.PTE_WRITABLE
    pdpt, pd, pt = tables, tables + 0x1000, tables + 0x2000
    index = [(va >> shift) & 0x1FF for shift in (39, 30, 21, 12)]
    vm.memory.write(modes.PML4_ADDRESS + 8 * index[0], struct.pack("<Q", pdpt | rw))
    vm.memory.write(pdpt + 8 * index[1], struct.pack("<Q", pd | rw))
    vm.memory.write(pd + 8 * index[2], struct.pack("<Q", pt | rw))
    vm.memory.write(pt + 8 * index[3], struct.pack("<Q", pa | modes.PTE_PRESENT))


def test_translate_walks_the_guest_page_tables(vm, translation):
    cpu = vm.vcpu(0, mode="long")
    for address in (0, 0x1234, modes.PML4_ADDRESS, 0x3FFF_FFFF):
        assert cpu.translate(address) == address  # pyvt's identity map
    add_4k_mapping(vm, MAPPED_VA, MAPPED_PA)
    assert cpu.translate(MAPPED_VA + 0x9A) == MAPPED_PA + 0x9A
    raw = cpu.fd.translate(MAPPED_VA)
    assert (raw.linear_address, raw.valid, raw.physical_address) == (MAPPED_VA, 1, MAPPED_PA)
    with pytest.raises(pyvt.UnmappedAddressError, match=f"{MAPPED_VA + 0x1000:#x}"):
        cpu.translate(MAPPED_VA + 0x1000)  # the next page: not mapped
    with pytest.raises(pyvt.UnmappedAddressError):
        cpu.translate(0x10_0000_0000)  # 64 GiB: beyond the identity map
    with pytest.raises(pyvt.ArgumentTypeError):
        cpu.translate("0x1000")
    # The guest reads through the same mapping what translate() said.
    vm.memory.write(MAPPED_PA + 0x9A, b"\x5a")
    vm.memory.write(CODE, pyvt.assemble(f"""
        movabs ${MAPPED_VA + 0x9A:#x}, %rax
        mov (%rax), %al
        out %al, ${0xF0:#x}
        hlt
    """, at=CODE))
    cpu.regs.rip = CODE
    expect_out(cpu, 0xF0, 0x5A)


def test_translate_without_paging_is_the_identity(vm, translation):
    cpu = vm.vcpu(0, mode="protected")
    assert cpu.translate(0x12345678) == 0x12345678


# -- the clocks -------------------------------------------------------------------

MSR_KVM_SYSTEM_TIME_NEW = 0x4B564D01
PVCLOCK_GUEST_STOPPED = 1 << 1
PVCLOCK_PAGE = 0x7000  # struct pvclock_vcpu_time_info: system_time at 16, flags at 29


def kvmclock_guest(vm) -> pyvt.Vcpu:
    """A guest with kvmclock enabled (by the host, as firmware would) at
    PVCLOCK_PAGE, that writes to port 0xf0 each time it runs."""
    vm.memory.write(CODE, pyvt.assemble(".code16\n 1: out %al, $0xf0\n jmp 1b\n", at=CODE))
    cpu = vm.vcpu(0, mode="real")
    cpu.regs.rip = CODE
    cpu.set_msrs({MSR_KVM_SYSTEM_TIME_NEW: PVCLOCK_PAGE | 1})
    return cpu


def guest_system_time(vm) -> int:
    return vm.memory.read_int(PVCLOCK_PAGE + 16, 8)


@pytest.mark.requires_cap("ADJUST_CLOCK")
def test_clock_get_set_round_trip_moves_the_guests_kvmclock(vm):
    cpu = kvmclock_guest(vm)
    assert isinstance(cpu.run(timeout=30), exits.Io)
    before = vm.fd.get_clock()
    assert before.clock > 0
    seen_before = guest_system_time(vm)
    jump = 3600 * 10**9  # an hour ahead
    vm.fd.set_clock(before.clock + jump)
    after = vm.fd.get_clock()
    assert before.clock + jump <= after.clock < before.clock + jump + 60 * 10**9
    assert isinstance(cpu.run(timeout=30), exits.Io)
    assert guest_system_time(vm) >= seen_before + jump  # the guest sees the jump
    # The struct get_clock returns goes back in as it is.
    vm.fd.set_clock(before)
    assert vm.fd.get_clock().clock < after.clock
    with pytest.raises(pyvt.ArgumentError):
        vm.fd.set_clock(-1)
    with pytest.raises(pyvt.ArgumentTypeError):
        vm.fd.set_clock(cpu.fd.get_regs())


@pytest.mark.requires_cap("KVMCLOCK_CTRL")
def test_kvmclock_ctrl_needs_a_guest_with_kvmclock(vm):
    cpu = vm.vcpu(0, mode="real")
    with pytest.raises(pyvt.KvmError, match="kvmclock"):
        cpu.fd.kvmclock_ctrl()


@pytest.mark.requires_cap("KVMCLOCK_CTRL")
def test_kvmclock_ctrl_sets_pvclock_guest_stopped(vm):
    cpu = kvmclock_guest(vm)
    assert isinstance(cpu.run(timeout=30), exits.Io)
    assert not vm.memory.read(PVCLOCK_PAGE + 29, 1)[0] & PVCLOCK_GUEST_STOPPED
    cpu.fd.kvmclock_ctrl()
    assert isinstance(cpu.run(timeout=30), exits.Io)
    assert vm.memory.read(PVCLOCK_PAGE + 29, 1)[0] & PVCLOCK_GUEST_STOPPED


@pytest.mark.requires_cap("GET_TSC_KHZ")
def test_tsc_khz_get(vm):
    cpu = vm.vcpu(0, mode="real")
    khz = cpu.fd.get_tsc_khz()
    assert 100_000 < khz < 100_000_000  # 100 MHz - 100 GHz


@pytest.mark.requires_cap("GET_TSC_KHZ", "TSC_CONTROL")
def test_tsc_khz_set_round_trip(vm):
    cpu = vm.vcpu(0, mode="real")
    half = cpu.fd.get_tsc_khz() // 2
    cpu.fd.set_tsc_khz(half)
    assert cpu.fd.get_tsc_khz() == half


def test_tsc_khz_set_names_the_missing_capability(vm):
    if vm.kvm.check_extension("TSC_CONTROL"):
        pytest.skip(f"{vm.kvm.path} has KVM_CAP_TSC_CONTROL: setting the rate works there")
    cpu = vm.vcpu(0, mode="real")
    with pytest.raises(pyvt.KvmError, match="KVM_CAP_TSC_CONTROL"):
        cpu.fd.set_tsc_khz(1_000_000)


# -- sregs2, enable_cap on the vCPU --------------------------------------------------


@pytest.mark.requires_cap("SREGS2")
def test_sregs2_round_trip_reaches_the_guest(vm):
    cpu = vm.vcpu(0, mode="long")
    sregs2 = cpu.fd.get_sregs2()
    sregs = cpu.fd.get_sregs()
    assert (sregs2.cr0, sregs2.cr3, sregs2.cr4, sregs2.efer, sregs2.cs.selector) == (
        sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer, sregs.cs.selector)
    assert not sregs2.flags & lib.KVM_SREGS2_FLAGS_PDPTRS_VALID  # long mode: no PDPTRs
    sregs2.cr2 = 0xC0FFEE
    cpu.fd.set_sregs2(sregs2)
    assert cpu.fd.get_sregs().cr2 == 0xC0FFEE
    vm.memory.write(CODE, pyvt.assemble("mov %cr2, %rax\n out %eax, $0xf0\n hlt\n", at=CODE))
    cpu.regs.rip = CODE
    exit = cpu.run(timeout=30)
    assert isinstance(exit, exits.Io) and exit.data == struct.pack("<I", 0xC0FFEE), exit
    with pytest.raises(pyvt.ArgumentTypeError):
        cpu.fd.set_sregs2(sregs)


@pytest.mark.requires_cap("ENFORCE_PV_FEATURE_CPUID")
def test_enable_cap_on_the_vcpu_changes_what_the_guest_may_do(vm):
    # With PV-feature enforcement and no KVM_FEATURE_CLOCKSOURCE2 in CPUID,
    # the guest's write to the kvmclock MSR faults (no IDT: a triple fault).
    image = pyvt.assemble(f"""
        .code32
        mov ${MSR_KVM_SYSTEM_TIME_NEW:#x}, %ecx
        mov ${PVCLOCK_PAGE | 1:#x}, %eax
        xor %edx, %edx
        wrmsr
        out %al, $0xf0
        hlt
    """, at=CODE)
    outcomes = []
    for enforce in (False, True):
        with pyvt.Vm("16M", backend=vm.backend) as machine:
            machine.memory.write(CODE, image)
            cpu = machine.vcpu(0, mode="protected")
            cpu.cpuid = [e if e.function != 0x40000001 else
                         pyvt.kvm.CpuidEntry(0x40000001) for e in cpu.cpuid]
            if enforce:
                cpu.fd.enable_cap("ENFORCE_PV_FEATURE_CPUID", 1)
            cpu.regs.rip = CODE
            outcomes.append(type(cpu.run(timeout=30)))
    assert outcomes == [exits.Io, exits.Shutdown]


def test_vcpu_enable_cap_checks_its_arguments(vm):
    cpu = vm.vcpu(0, mode="real")
    with pytest.raises(pyvt.ArgumentError, match="at most 4"):
        cpu.fd.enable_cap("ENFORCE_PV_FEATURE_CPUID", 1, 2, 3, 4, 5)
    with pytest.raises(pyvt.ArgumentError, match="unknown capability"):
        cpu.fd.enable_cap("NO_SUCH_CAP")


# -- capabilities this host may lack: SMI, nested state, Hyper-V CPUID -----------


@pytest.mark.requires_cap("X86_SMM")
def test_smi_enters_system_management_mode(vm):
    cpu = vm.vcpu(0, mode="real")
    vm.memory.write(CODE, pyvt.assemble(".code16\n 1: out %al, $0xf0\n jmp 1b\n", at=CODE))
    cpu.regs.rip = CODE
    cpu.fd.smi()
    # SMBASE 0x30000: the SMI handler at 0x38000 reports through port 0xf1.
    vm.memory.write(0x38000, pyvt.assemble(".code16\n mov $0x55, %al\n out %al, $0xf1\n rsm\n",
                                           at=0x38000))
    exit = cpu.run(timeout=30)
    assert isinstance(exit, exits.Io) and exit.port == 0xF1, exit


@pytest.mark.parametrize("call, cap", [
    (lambda cpu: cpu.fd.smi(), "KVM_CAP_X86_SMM"),
    (lambda cpu: cpu.fd.get_nested_state(), "KVM_CAP_NESTED_STATE"),
    (lambda cpu: cpu.fd.set_nested_state(bytes(128)), "KVM_CAP_NESTED_STATE"),
    (lambda cpu: cpu.fd.get_supported_hv_cpuid(), "KVM_CAP_HYPERV_CPUID"),
    (lambda cpu: cpu.fd.vm.kvm.get_supported_hv_cpuid(), "KVM_CAP_SYS_HYPERV_CPUID"),
])
def test_a_missing_capability_is_named(vm, call, cap):
    if vm.kvm.check_extension(cap):
        pytest.skip(f"{vm.kvm.path} has {cap}: the call works there")
    cpu = vm.vcpu(0, mode="real")
    with pytest.raises(pyvt.KvmError, match=cap):
        call(cpu)


@pytest.mark.requires_cap("NESTED_STATE")
def test_nested_state_round_trip(vm):
    cpu = vm.vcpu(0, mode="real")
    state = cpu.fd.get_nested_state()
    assert len(struct_bytes(state)) == state.size >= 128
    cpu.fd.set_nested_state(state)
    cpu.fd.set_nested_state(struct_bytes(state))
    with pytest.raises(pyvt.ArgumentError):
        cpu.fd.set_nested_state(struct_bytes(state)[:16])


@pytest.mark.requires_cap("SYS_HYPERV_CPUID")
def test_supported_hv_cpuid_lists_hyperv_leaves(kvm):
    leaves = kvm.get_supported_hv_cpuid()
    assert leaves and all(0x40000000 <= e.function <= 0x4000FFFF for e in leaves)
