"""Ring-3 vCPUs: guests at CPL 3 in pyvt's flat address space, with port
I/O, and exceptions that end the run as exits instead of triple faults."""

import struct

import pytest

import pyvt
from pyvt import exits, guest_exceptions, modes

pytestmark = pytest.mark.requires_kvm

CODE = 0x1000


def ring3(vm, source: str, **regs):
    vm.memory.write(CODE, pyvt.assemble(source, at=CODE, bits=64))
    cpu = vm.vcpu(0, mode="long", ring=3)
    cpu.regs.rip = CODE
    for name, value in regs.items():
        setattr(cpu.regs, name, value)
    return cpu


def xorshift(x: int, rounds: int) -> int:
    mask = (1 << 64) - 1
    for _ in range(rounds):
        x ^= (x << 13) & mask
        x ^= x >> 7
        x ^= (x << 17) & mask
    return x


XORSHIFT = """
    mov $1, %rax
1:  mov %rax, %rdx; shl $13, %rdx; xor %rdx, %rax
    mov %rax, %rdx; shr $7, %rdx; xor %rdx, %rax
    mov %rax, %rdx; shl $17, %rdx; xor %rdx, %rax
    dec %rcx; jnz 1b
    mov $0x3f8, %dx
    out %al, %dx
    hlt
"""


def test_a_ring3_guest_computes_does_port_io_and_halts(vm):
    cpu = ring3(vm, XORSHIFT, rcx=100_000)
    assert cpu.ring == 3
    assert cpu.sregs.cs.selector == modes.USER_CODE64_SELECTOR and cpu.sregs.cs.dpl == 3
    exit = cpu.run(timeout=30)
    assert isinstance(exit, exits.Hlt), exit
    expected = xorshift(1, 100_000)
    assert cpu.regs.rax == expected
    assert vm.console.output == bytes([expected & 0xFF])  # the UART, from CPL 3
    # Resumed in ring 3, past the hlt, as a hlt at CPL 0 leaves it.
    assert exit.rip == cpu.regs.rip == CODE + len(pyvt.assemble(XORSHIFT, at=CODE, bits=64))
    assert cpu.sregs.cs.selector & 3 == 3 and cpu.sregs.ss.selector & 3 == 3


def test_a_python_handler_answers_a_ring3_read(vm):
    vm.on_io(0x10, lambda exit: None if exit.is_write else 0x5A)
    cpu = ring3(vm, "in $0x10, %al\nmov %al, %bl\nout %al, $0x10\nhlt\n")
    assert isinstance(cpu.run(timeout=10), exits.Hlt)
    assert cpu.regs.rbx & 0xFF == 0x5A


def test_a_page_fault_is_an_exit_with_cr2_and_the_faulting_state(vm):
    cpu = ring3(vm, "mov $7, %rbx\nmovabs $0x123456789000, %rax\nmovq $1, (%rax)\nhlt\n")
    exit = cpu.run(timeout=10)
    assert isinstance(exit, exits.GuestException), exit
    store = CODE + len(pyvt.assemble("mov $7, %rbx\nmovabs $0x123456789000, %rax\n",
                                     at=CODE, bits=64))
    assert (exit.vector, exit.rip, exit.cr2) == (14, store, 0x123456789000)
    assert exit.error_code == 0x6  # a user-mode write to a page not present
    assert "#PF" in repr(exit) and "cr2=0x123456789000" in repr(exit)
    # The registers are the guest's at the faulting instruction, in ring 3.
    assert (cpu.regs.rip, cpu.regs.rbx, cpu.regs.rsp) == (store, 7, modes.STACK_TOP)
    assert cpu.sregs.cs.selector == modes.USER_CODE64_SELECTOR
    # Running again retries the instruction, like the hardware.
    assert cpu.run(timeout=10) == exit
    # Mapping the page (here: moving the store) lets it go on.
    cpu.regs.rax = 0x8000
    assert isinstance(cpu.run(timeout=10), exits.Hlt)
    assert vm.memory.read_int(0x8000) == 1


@pytest.mark.parametrize("setup,fault,vector,error_code", [
    ("", "ud2", 6, 0),
    ("xor %ecx, %ecx", "div %ecx", 0, 0),
    ("", "mov %cr3, %rax", 13, 0),  # privileged
])
def test_exceptions_are_reported_with_their_vector_and_error_code(vm, setup, fault, vector,
                                                                   error_code):
    # (`int N` is left out: hardware raises #GP(N << 3 | 2), PVM #UD.)
    cpu = ring3(vm, f"{setup}\n{fault}\nhlt\n")
    faulting = CODE + len(pyvt.assemble(setup, at=CODE, bits=64)) if setup else CODE
    exit = cpu.run(timeout=10)
    assert isinstance(exit, exits.GuestException), exit
    assert (exit.vector, exit.error_code, exit.cr2) == (vector, error_code, None)
    assert exit.rip == cpu.regs.rip == faulting


def test_int3_is_a_breakpoint_exception_past_the_instruction(vm):
    # Its gate is DPL 3, as Linux makes it, so ring 3 gets #BP and not #GP.
    cpu = ring3(vm, "int3\nhlt\n")
    exit = cpu.run(timeout=10)
    assert isinstance(exit, exits.GuestException), exit
    assert (exit.vector, exit.error_code) == (3, 0)
    assert exit.rip == cpu.regs.rip == CODE + 1  # a trap: rip is past it
    assert isinstance(cpu.run(timeout=10), exits.Hlt)


def test_the_exception_frame_is_read_from_pyvts_stack(vm):
    cpu = ring3(vm, "ud2\n")
    exit = cpu.run(timeout=10)
    frame = struct.unpack("<7Q", vm.memory.read(guest_exceptions.FRAME_ADDRESS, 56))
    assert frame[0] == exit.vector == 6
    assert frame[2] == exit.rip == CODE
    assert frame[3] == modes.USER_CODE64_SELECTOR and frame[6] == modes.USER_DATA_SELECTOR


def test_ring3_state_survives_snapshot_restore_and_clone(vm):
    cpu = ring3(vm, "inc %rbx\nhlt\njmp 0b\n".replace("0b", f"{CODE:#x}"), rbx=0)
    assert isinstance(cpu.run(timeout=10), exits.Hlt)
    snap = vm.snapshot()
    try:
        assert isinstance(cpu.run(timeout=10), exits.Hlt) and cpu.regs.rbx == 2
        vm.restore(snap)
        assert cpu.regs.rbx == 1 and cpu.sregs.cs.selector == modes.USER_CODE64_SELECTOR
        assert isinstance(cpu.run(timeout=10), exits.Hlt) and cpu.regs.rbx == 2
        with pyvt.Vm.from_snapshot(snap) as clone:
            twin = clone.vcpus[0]
            assert twin.ring == 3 and twin.save_state().ring == 3
            assert isinstance(twin.run(timeout=10), exits.Hlt) and twin.regs.rbx == 2
            twin.regs.rip = 0x123456789000  # off the map: a fetch fault, reported
            exit = twin.run(timeout=10)
            assert isinstance(exit, exits.GuestException) and exit.vector == 14
            assert exit.cr2 == exit.rip == 0x123456789000
    finally:
        snap.close()


def test_a_saved_file_keeps_the_ring(vm, tmp_path):
    cpu = ring3(vm, "hlt\n")
    snap = vm.snapshot()
    try:
        snap.save(tmp_path / "ring3.snap")
    finally:
        snap.close()
    loaded = pyvt.Snapshot.load(tmp_path / "ring3.snap")
    try:
        assert loaded.vcpus[0].ring == 3
        with pyvt.Vm.from_snapshot(loaded) as clone:
            assert clone.vcpus[0].ring == 3
            assert isinstance(clone.vcpus[0].run(timeout=10), exits.Hlt)
            assert clone.vcpus[0].regs.rip == CODE + 1
    finally:
        loaded.close()
    assert cpu.ring == 3


def test_ring0_and_ring3_vcpus_share_one_vm(vm):
    vm.memory.write(CODE, pyvt.assemble("mov $3, %rax\nhlt\n", at=CODE, bits=64))
    vm.memory.write(0x2000, pyvt.assemble("mov $4, %rax\nhlt\n", at=0x2000, bits=64))
    kernel = vm.vcpu(0, mode="long")
    user = vm.vcpu(1, mode="long", ring=3)
    kernel.regs.rip, user.regs.rip = CODE, 0x2000
    assert isinstance(kernel.run(timeout=10), exits.Hlt) and kernel.regs.rax == 3
    assert isinstance(user.run(timeout=10), exits.Hlt) and user.regs.rax == 4
    assert kernel.sregs.cs.selector == modes.CODE64_SELECTOR


@pytest.mark.parametrize("mode,ring,error", [
    ("real", 3, pyvt.InvalidModeError),
    ("protected", 3, pyvt.InvalidModeError),
    ("long", 1, pyvt.ArgumentError),
    ("long", True, pyvt.ArgumentError),
    ("long", "3", pyvt.ArgumentError),
])
def test_bad_rings_are_refused_before_a_vcpu_exists(vm, mode, ring, error):
    with pytest.raises(error, match="ring"):
        vm.vcpu(0, mode=mode, ring=ring)
    assert not vm.vcpus
    vm.vcpu(0, mode="long", ring=3)  # index 0 is still free


#: Where a reset vCPU starts (CS base 0xffff0000).
RESET_IP = 0xFFF0


@pytest.mark.parametrize("ring, kind", [(0, exits.Shutdown), (3, exits.GuestException)])
def test_failure_exits_carry_the_instruction(ring, kind):
    """A ring-0 #UD triple-faults (no IDT); at ring 3 pyvt's IDT catches it."""
    with pyvt.Vm("2M") as vm:
        vm.memory.write(0x1000, b"\x90\x0f\x0b")  # nop; ud2
        cpu = vm.vcpu(0, mode="long", ring=ring)
        cpu.regs.rip = 0x1000
        exit = cpu.run(timeout=10)
        assert isinstance(exit, kind), exit
        if ring == 0 and exit.rip == RESET_IP:
            # AMD-V backends (kvm-amd, pyvt.ko under AMD-V) reset the vCPU at
            # a shutdown: there is no faulting instruction left to show.
            assert "triple-faulted" in exit.describe()
            return
        assert exit.rip == 0x1001
        assert exit.instruction[:2] == b"\x0f\x0b"
        assert "0f 0b" in exit.describe()
        try:
            import capstone  # noqa: F401
        except ImportError:
            return
        assert exit.disassembly == "ud2" and "(ud2)" in exit.describe()
