"""The access an I/O exit leaves pending, and everything that can come
between that exit and the next run(): reply(), register writes, snapshots,
restores, a handler that raised.

Rule (Vcpu.reply's docstring): a pending read is completed exactly once,
with the value reply() or a handler gave (all ones if nobody answered);
register writes made after the exit win over the completion; a snapshot
holds the state before an unanswered read; a restore abandons it; a read
whose handler raised runs again, a write whose handler raised does not.
"""

import pytest

import pyvt
from pyvt import exits

pytestmark = pytest.mark.requires_kvm

# in $0x10, %al; inc %rbx; jmp back: every run() ends at the same `in`.
IN_LOOP = ".code64\n.globl _start\n_start: in $0x10, %al\n inc %rbx\n jmp _start\n"
# At 0x2000: mov $7, %eax; hlt (6 bytes, so the Hlt exit is at 0x2006).
ELSEWHERE = ".code64\n.globl _start\n_start: mov $7, %eax\n hlt\n"


def long_mode_guest(vm, source):
    """vCPU 0 in long mode at 0x1000, where ``source`` is; ELSEWHERE at 0x2000."""
    vm.memory.write(0x1000, pyvt.assemble(source))
    vm.memory.write(0x2000, pyvt.assemble(ELSEWHERE, at=0x2000))
    cpu = vm.vcpu(0, mode="long")
    cpu.regs.rip = 0x1000
    return cpu


@pytest.fixture
def in_loop(vm):
    return long_mode_guest(vm, IN_LOOP)


def run_to_in(cpu):
    exit = cpu.run(timeout=10)
    assert exit == exits.Io(0x10, 1, "in", b"", 1, 0x1000), exit
    return exit


def test_reply_then_register_write_keeps_both(in_loop):
    cpu = in_loop
    run_to_in(cpu)
    cpu.reply(5)
    cpu.regs.rcx = 0x1234          # completes the `in` first, then writes
    assert cpu.regs.rax & 0xFF == 5 and cpu.regs.rip == 0x1002
    run_to_in(cpu)                 # inc %rbx; jmp; back at the `in`
    assert cpu.regs.rax & 0xFF == 5 and cpu.regs.rcx == 0x1234 and cpu.regs.rbx == 1


def test_new_rip_after_reply_wins(in_loop):
    cpu = in_loop
    run_to_in(cpu)
    cpu.reply(5)
    cpu.regs.rip = 0x2000
    assert cpu.run(timeout=10) == exits.Hlt(0x2006)
    assert cpu.regs.rax == 7


def test_unanswered_read_reads_all_ones(in_loop):
    cpu = in_loop
    cpu.regs.rax = 0
    run_to_in(cpu)
    run_to_in(cpu)
    assert cpu.regs.rax == 0xFF and cpu.regs.rbx == 1


def test_reply_can_change_until_the_read_completes(in_loop):
    cpu = in_loop
    run_to_in(cpu)
    cpu.reply(1)
    cpu.reply(2)                   # the answer may change until then
    cpu.regs.rdx = 0               # completes the read with 2
    with pytest.raises(pyvt.Error, match="none is pending"):
        cpu.reply(3)
    run_to_in(cpu)
    assert cpu.regs.rax & 0xFF == 2


@pytest.mark.parametrize("write, read_back, value", [
    # fcw, not mxcsr: this PVM host's KVM_SET_FPU ignores mxcsr (KVM_GET_FPU reads 0).
    (lambda cpu, v: setattr(cpu.fpu, "fcw", v), lambda cpu: cpu.fpu.fcw, 0x27F),
    (lambda cpu, v: setattr(cpu.sregs, "cr2", v), lambda cpu: cpu.sregs.cr2, 0x1234),
], ids=["fpu", "sregs"])
def test_sregs_and_fpu_writes_also_complete_the_read_first(in_loop, write, read_back, value):
    cpu = in_loop
    run_to_in(cpu)
    cpu.reply(9)
    write(cpu, value)                # alone: it must complete the read first
    assert cpu.regs.rax & 0xFF == 9 and cpu.regs.rip == 0x1002
    assert read_back(cpu) == value   # and still be there afterwards


def test_a_handler_that_raised_leaves_the_access_to_run_again(vm, in_loop):
    cpu = in_loop
    calls = []

    def flaky(exit):
        calls.append(exit)
        if len(calls) == 1:
            raise RuntimeError("handler bug")
        cpu.stop()                 # end the loop after this `in`
        return 0x55

    vm.on_io(0x10, flaky)
    with pytest.raises(RuntimeError):
        cpu.run(timeout=10)
    assert cpu.regs.rip == 0x1000 and cpu.regs.rbx == 0   # not executed
    with pytest.raises(pyvt.Error, match="none is pending"):
        cpu.reply(1)               # the raise abandoned it: nothing to answer
    assert isinstance(cpu.run(timeout=10), exits.Stopped)
    assert len(calls) == 2 and cpu.regs.rax & 0xFF == 0x55


def test_keyboard_interrupt_in_a_handler_then_new_rip(vm, in_loop):
    cpu = in_loop

    def interrupted(exit):
        raise KeyboardInterrupt

    vm.on_io(0x10, interrupted)
    with pytest.raises(KeyboardInterrupt):
        cpu.run(timeout=10)
    vm.off_io(0x10)
    cpu.regs.rip = 0x2000
    assert cpu.run(timeout=10) == exits.Hlt(0x2006)


def test_restore_after_a_handler_raised_runs_the_access_again(vm, in_loop):
    cpu = in_loop
    snap = vm.snapshot()
    answers = iter([RuntimeError("handler bug"), 0x55])
    calls = []

    def handler(exit):
        calls.append(exit)
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        cpu.stop()
        return answer

    vm.on_io(0x10, handler)
    with pytest.raises(RuntimeError):
        cpu.run(timeout=10)
    vm.restore(snap)
    assert cpu.regs.rip == 0x1000
    assert isinstance(cpu.run(timeout=10), exits.Stopped)
    assert len(calls) == 2 and cpu.regs.rax & 0xFF == 0x55 and cpu.regs.rbx == 0
    snap.close()


def test_snapshot_between_exit_and_reply(vm, in_loop):
    cpu = in_loop
    run_to_in(cpu)
    snap = vm.snapshot()
    cpu.reply(0x42)                # still reaches the guest
    run_to_in(cpu)
    assert cpu.regs.rax & 0xFF == 0x42 and cpu.regs.rbx == 1
    # The snapshot holds the state before the unanswered `in`: a clone and
    # a restore run it again.
    with pyvt.Vm.from_snapshot(snap) as clone:
        assert clone.vcpus[0].regs.rip == 0x1000
        run_to_in(clone.vcpus[0])
        assert clone.vcpus[0].regs.rbx == 0
    vm.restore(snap)
    with pytest.raises(pyvt.Error, match="none is pending"):
        cpu.reply(1)               # restore abandoned the read
    run_to_in(cpu)
    assert cpu.regs.rbx == 0
    snap.close()


def test_restore_while_a_read_is_pending(vm, in_loop):
    cpu = in_loop
    cpu.regs.rbx = 100
    snap = vm.snapshot()
    run_to_in(cpu)
    cpu.reply(0x11)
    vm.restore(snap)               # the pending `in` must not complete on top
    assert cpu.regs.rbx == 100 and cpu.regs.rip == 0x1000
    run_to_in(cpu)
    cpu.reply(0x22)
    run_to_in(cpu)
    assert cpu.regs.rax & 0xFF == 0x22 and cpu.regs.rbx == 101
    snap.close()


OUT_ONCE = """.code64
.globl _start
_start:
    mov $0x61, %al
    out %al, $0x10
    inc %rbx
    hlt
"""


def test_snapshot_after_an_unclaimed_out_starts_after_it(vm):
    cpu = long_mode_guest(vm, OUT_ONCE)
    exit = cpu.run(timeout=10)
    # Its rip is 0x1002 (the out) where KVM retires it on the next KVM_RUN,
    # 0x1004 where KVM's emulator ran it (PVM): both are the same state.
    assert isinstance(exit, exits.Io) and exit.value == 0x61 and exit.direction == "out"
    snap = vm.snapshot()           # the guest has done the out
    assert cpu.run(timeout=10) == exits.Hlt(0x1008)
    vm.restore(snap)
    assert cpu.regs.rip == 0x1004  # after the out: it does not happen twice
    assert cpu.run(timeout=10) == exits.Hlt(0x1008)
    assert cpu.regs.rbx == 1
    snap.close()


def test_new_rip_after_an_unclaimed_out_wins(vm):
    cpu = long_mode_guest(vm, OUT_ONCE)
    assert isinstance(cpu.run(timeout=10), exits.Io)
    cpu.regs.rip = 0x2000
    assert cpu.run(timeout=10) == exits.Hlt(0x2006)
    assert cpu.regs.rbx == 0


MMIO_READ = """.code64
.globl _start
_start:
    mov $0x10000000, %rsi
    mov (%rsi), %eax
    hlt
"""


def test_mmio_read_reply_then_register_write(vm):
    cpu = long_mode_guest(vm, MMIO_READ)
    exit = cpu.run(timeout=10)
    assert isinstance(exit, exits.Mmio) and not exit.is_write
    assert exit.address == 0x10000000 and exit.size == 4
    cpu.reply(0x12345678)
    cpu.regs.rbx = 0xABC
    assert cpu.run(timeout=10) == exits.Hlt(0x100a)
    assert cpu.regs.rax == 0x12345678 and cpu.regs.rbx == 0xABC


def test_refused_sregs_write_leaves_reads_and_later_writes_working(vm):
    cpu = vm.vcpu(0, mode="long")
    cr0 = cpu.sregs.cr0
    with pytest.raises(pyvt.KvmError):
        cpu.sregs.cr0 = 0xFFFFFFFFFFFFFFFF      # KVM refuses it
    assert cpu.sregs.cr0 == cr0 == cpu.fd.get_sregs().cr0
    cpu.sregs.cr3 = 0x91000
    cpu.sregs.cs.base = 0
    assert cpu.fd.get_sregs().cr3 == 0x91000


def test_a_write_whose_handler_raised_is_not_made_twice(vm):
    # Whether KVM retires an out at the exit (its emulator, on PVM) or on
    # the next KVM_RUN (hardware), the guest goes on after it.
    cpu = long_mode_guest(vm, OUT_ONCE)
    calls = []

    def failing(exit):
        calls.append(exit.value)
        raise RuntimeError("handler bug")

    vm.on_io(0x10, failing)
    with pytest.raises(RuntimeError):
        cpu.run(timeout=10)
    assert cpu.regs.rip == 0x1004
    assert cpu.run(timeout=10) == exits.Hlt(0x1008)
    assert calls == [0x61] and cpu.regs.rbx == 1
