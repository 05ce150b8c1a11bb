"""rdmsr/wrmsr answered from Python: the MSR filter (VmFd.x86_set_msr_filter),
user-space MSR exits (exits.Msr, Vcpu.reply) and vm.on_msr handlers.

The guests are long-mode; ECX (the MSR index) is set from Python.  Two MSRs:
MADE_UP, which no CPU has (KVM's default: #GP), and the TSC (0x10), which
KVM answers itself unless the filter sends it to user space.  Every guest
has an IDT whose #GP handler halts at GP_HALT, so a refused access shows.
"""

import struct

import pytest

import pyvt
from pyvt import exits, modes
from pyvt._kvm import lib
from pyvt.msr_filter import RANGE_MSRS, filter_ranges

pytestmark = pytest.mark.requires_cap("X86_USER_SPACE_MSR", "X86_MSR_FILTER")

MADE_UP = 0x474F4F00
TSC = 0x10
READ_WRITE = lib.KVM_MSR_FILTER_READ | lib.KVM_MSR_FILTER_WRITE

# rdmsr (2 bytes) at 0x1000; inc %rbx; jmp back: every run() ends at the rdmsr.
RDMSR_LOOP = ".code64\n.globl _start\n_start: rdmsr\n inc %rbx\n jmp _start\n"
# rdmsr, or wrmsr, at 0x1000, then hlt at 0x1002 (so the Hlt exit is at 0x1003).
RDMSR_HLT = ".code64\n.globl _start\n_start: rdmsr\n hlt\n"
WRMSR_HLT = ".code64\n.globl _start\n_start: wrmsr\n hlt\n"

IDT = 0x3000
GP_HANDLER = 0x2000  # hlt
GP_HALT = exits.Hlt(GP_HANDLER + 1)


def msr_guest(vm, source, index):
    """vCPU 0 in long mode at 0x1000 running ``source`` with ECX = ``index``,
    and an IDT whose #GP gate (vector 13) goes to a hlt at GP_HANDLER."""
    vm.memory.write(0x1000, pyvt.assemble(source))
    vm.memory.write(GP_HANDLER, b"\xf4")  # hlt
    gate = struct.pack("<HHBBHIxxxx", GP_HANDLER & 0xFFFF, modes.CODE64_SELECTOR, 0, 0x8E,
                       (GP_HANDLER >> 16) & 0xFFFF, GP_HANDLER >> 32)
    vm.memory.write(IDT + 13 * 16, gate)
    cpu = vm.vcpu(0, mode="long")
    cpu.sregs.idt.base = IDT
    cpu.sregs.idt.limit = 32 * 16 - 1
    cpu.regs.rip = 0x1000
    cpu.regs.rcx = index
    return cpu


def faulted_at(vm, cpu):
    """The RIP the #GP handler's frame holds (the error code is below it)."""
    return int.from_bytes(vm.memory.read(cpu.regs.rsp + 8, 8), "little")


def edx_eax(cpu):
    return (cpu.regs.rdx & 0xFFFFFFFF) << 32 | (cpu.regs.rax & 0xFFFFFFFF)


def filter_to_user_space(vm, index):
    """What a VMM without vm.on_msr does: the thin layer's calls."""
    vm.fd.enable_cap("KVM_CAP_X86_USER_SPACE_MSR", lib.KVM_MSR_EXIT_REASON_FILTER)
    vm.fd.x86_set_msr_filter([(index, 1, READ_WRITE, ())])


def rdmsr_exit(index, rip=0x1000):
    return exits.Msr(index, False, None, exits.Msr.REASON_FILTER, rip)


# -- unclaimed MSR exits and reply() --------------------------------------------


def test_the_filter_makes_an_exit_and_reply_reaches_edx_eax(vm):
    cpu = msr_guest(vm, RDMSR_HLT, MADE_UP)
    filter_to_user_space(vm, MADE_UP)
    exit = cpu.run(timeout=10)
    assert exit == rdmsr_exit(MADE_UP), exit
    assert exit.direction == "rdmsr" and exit.reason_name == "filter"
    cpu.reply(0x1122334455667788)
    assert cpu.run(timeout=10) == exits.Hlt(0x1003)
    assert cpu.regs.rax == 0x55667788 and cpu.regs.rdx == 0x11223344


def test_the_filter_redirects_an_msr_kvm_handles(vm):
    cpu = msr_guest(vm, RDMSR_HLT, TSC)
    filter_to_user_space(vm, TSC)
    assert cpu.run(timeout=10) == rdmsr_exit(TSC)
    cpu.reply(42)
    assert cpu.run(timeout=10) == exits.Hlt(0x1003)
    assert edx_eax(cpu) == 42


def test_an_unknown_msr_exits_with_reason_unknown(vm):
    cpu = msr_guest(vm, WRMSR_HLT, MADE_UP)
    vm.fd.enable_cap("KVM_CAP_X86_USER_SPACE_MSR", lib.KVM_MSR_EXIT_REASON_UNKNOWN)
    cpu.regs.rax, cpu.regs.rdx = 0x5, 0x6
    exit = cpu.run(timeout=10)
    assert exit == exits.Msr(MADE_UP, True, 0x600000005, exits.Msr.REASON_UNKNOWN, 0x1000)
    assert exit.reason_name == "unknown"
    with pytest.raises(pyvt.Error, match="pending read"):
        cpu.reply(1)  # a write has nothing to answer
    assert cpu.run(timeout=10) == exits.Hlt(0x1003)  # accepted: no #GP


def test_an_unanswered_rdmsr_reads_all_ones(vm):
    cpu = msr_guest(vm, RDMSR_LOOP, MADE_UP)
    filter_to_user_space(vm, MADE_UP)
    assert cpu.run(timeout=10) == rdmsr_exit(MADE_UP)
    assert cpu.run(timeout=10) == rdmsr_exit(MADE_UP)
    assert cpu.regs.rax == 0xFFFFFFFF and cpu.regs.rdx == 0xFFFFFFFF and cpu.regs.rbx == 1


def test_reply_then_register_write_keeps_both(vm):
    cpu = msr_guest(vm, RDMSR_LOOP, MADE_UP)
    filter_to_user_space(vm, MADE_UP)
    assert cpu.run(timeout=10) == rdmsr_exit(MADE_UP)
    cpu.reply(0x0000000700000005)
    cpu.regs.rdi = 0x1234          # completes the rdmsr first, then writes
    assert cpu.regs.rax == 5 and cpu.regs.rdx == 7 and cpu.regs.rip == 0x1002
    with pytest.raises(pyvt.Error, match="none is pending"):
        cpu.reply(1)
    assert cpu.run(timeout=10) == rdmsr_exit(MADE_UP)
    assert cpu.regs.rdi == 0x1234 and cpu.regs.rbx == 1 and cpu.regs.rax == 5


def test_a_register_write_retires_a_pending_wrmsr(vm):
    cpu = msr_guest(vm, WRMSR_HLT, MADE_UP)
    filter_to_user_space(vm, MADE_UP)
    cpu.regs.rax, cpu.regs.rdx = 0x55, 0
    assert cpu.run(timeout=10) == exits.Msr(MADE_UP, True, 0x55, exits.Msr.REASON_FILTER, 0x1000)
    cpu.regs.rdi = 1
    assert cpu.regs.rip == 0x1002
    assert cpu.run(timeout=10) == exits.Hlt(0x1003)


def test_reply_refuses_a_value_wider_than_64_bits(vm):
    cpu = msr_guest(vm, RDMSR_HLT, MADE_UP)
    filter_to_user_space(vm, MADE_UP)
    cpu.run(timeout=10)
    with pytest.raises(pyvt.ArgumentError, match="MSR 0x474f4f00"):
        cpu.reply(1 << 64)
    with pytest.raises(pyvt.ArgumentTypeError):
        cpu.reply("5")
    cpu.reply(-1)
    assert cpu.run(timeout=10) == exits.Hlt(0x1003)
    assert edx_eax(cpu) == (1 << 64) - 1


@pytest.mark.parametrize("source", [RDMSR_HLT, WRMSR_HLT])
def test_refuse_msr_gives_the_guest_a_gp(vm, source):
    cpu = msr_guest(vm, source, MADE_UP)
    filter_to_user_space(vm, MADE_UP)
    assert isinstance(cpu.run(timeout=10), exits.Msr)
    cpu.refuse_msr()
    assert cpu.run(timeout=10) == GP_HALT and faulted_at(vm, cpu) == 0x1000
    with pytest.raises(pyvt.Error, match="none is pending"):
        cpu.refuse_msr()


def test_a_reply_after_refuse_msr_answers_the_read(vm):
    cpu = msr_guest(vm, RDMSR_HLT, MADE_UP)
    filter_to_user_space(vm, MADE_UP)
    cpu.run(timeout=10)
    cpu.refuse_msr()
    cpu.reply(4)
    assert cpu.run(timeout=10) == exits.Hlt(0x1003) and edx_eax(cpu) == 4


def test_a_snapshot_holds_the_rdmsr_before_it_ran(vm):
    cpu = msr_guest(vm, RDMSR_LOOP, MADE_UP)
    filter_to_user_space(vm, MADE_UP)
    assert cpu.run(timeout=10) == rdmsr_exit(MADE_UP)
    snap = vm.snapshot()
    cpu.reply(7)                   # still answers this vCPU's pending read
    assert cpu.run(timeout=10) == rdmsr_exit(MADE_UP)
    assert cpu.regs.rax == 7 and cpu.regs.rbx == 1
    cpu.reply(8)                   # pending again: the restore abandons it
    vm.restore(snap)
    assert cpu.regs.rip == 0x1000 and cpu.regs.rbx == 0
    with pytest.raises(pyvt.Error, match="none is pending"):
        cpu.reply(1)
    assert cpu.run(timeout=10) == rdmsr_exit(MADE_UP)  # the rdmsr runs again
    cpu.reply(9)
    assert cpu.run(timeout=10) == rdmsr_exit(MADE_UP)
    assert cpu.regs.rax == 9 and cpu.regs.rbx == 1


# -- vm.on_msr handlers -------------------------------------------------------------


def test_a_handlers_value_reaches_the_guest(vm):
    cpu = msr_guest(vm, RDMSR_HLT, TSC)
    seen = []

    def fake_tsc(exit):
        seen.append(exit)
        return 0xAABBCCDD11223344

    vm.on_msr(TSC, fake_tsc)
    assert cpu.run(timeout=10) == exits.Hlt(0x1003)
    assert seen == [rdmsr_exit(TSC)]
    assert cpu.regs.rax == 0x11223344 and cpu.regs.rdx == 0xAABBCCDD


def test_a_write_reaches_the_handler_with_its_value(vm):
    cpu = msr_guest(vm, WRMSR_HLT, MADE_UP + 2)
    cpu.regs.rax, cpu.regs.rdx = 0x89ABCDEF, 0x01234567
    writes = []
    vm.on_msr(range(MADE_UP, MADE_UP + 4), writes.append)
    assert cpu.run(timeout=10) == exits.Hlt(0x1003)
    assert writes == [exits.Msr(MADE_UP + 2, True, 0x0123456789ABCDEF,
                                exits.Msr.REASON_FILTER, 0x1000)]
    assert writes[0].direction == "wrmsr" and writes[0].value == 0x0123456789ABCDEF


@pytest.mark.parametrize("source", [RDMSR_HLT, WRMSR_HLT])
def test_a_handler_refusing_gives_the_guest_a_gp(vm, source):
    cpu = msr_guest(vm, source, MADE_UP)
    calls = []

    def refuse(exit):
        calls.append(exit)
        raise pyvt.MsrFault("no such MSR here")

    vm.on_msr(MADE_UP, refuse)
    assert cpu.run(timeout=10) == GP_HALT
    assert len(calls) == 1 and faulted_at(vm, cpu) == 0x1000


def test_off_msr_gives_the_msrs_back_to_kvm(vm):
    cpu = msr_guest(vm, RDMSR_LOOP, TSC)
    calls = []

    def handler(exit):
        calls.append(exit)
        if len(calls) == 2:
            cpu.stop()
        return 3

    vm.on_msr(TSC, handler)
    vm.on_msr(MADE_UP, handler)        # so that a filter stays after off_msr(TSC)
    assert isinstance(cpu.run(timeout=10), exits.Stopped)
    assert edx_eax(cpu) == 3 and len(calls) == 2
    vm.off_msr(TSC)
    cpu.regs.rip = 0x1000
    assert isinstance(cpu.run(timeout=0.5), exits.Timeout)  # KVM answers: no exit
    assert len(calls) == 2 and edx_eax(cpu) != 3              # the guest's TSC
    vm.off_msr(MADE_UP)                # the last handler: the filter goes
    cpu.regs.rip, cpu.regs.rcx = 0x1000, MADE_UP
    assert cpu.run(timeout=10) == GP_HALT                   # KVM's default for it
    assert len(calls) == 2 and faulted_at(vm, cpu) == 0x1000


def test_a_handler_that_raised_leaves_the_rdmsr_to_run_again(vm):
    cpu = msr_guest(vm, RDMSR_LOOP, MADE_UP)
    calls = []

    def flaky(exit):
        calls.append(exit)
        if len(calls) == 1:
            raise RuntimeError("handler bug")
        cpu.stop()
        return 0x55

    vm.on_msr(MADE_UP, flaky)
    with pytest.raises(RuntimeError):
        cpu.run(timeout=10)
    assert cpu.regs.rip == 0x1000 and cpu.regs.rbx == 0   # not executed
    with pytest.raises(pyvt.Error, match="none is pending"):
        cpu.reply(1)
    assert isinstance(cpu.run(timeout=10), exits.Stopped)
    # One rdmsr ran, with the second answer: the first was never completed.
    assert calls == [rdmsr_exit(MADE_UP)] * 2 and cpu.regs.rax == 0x55 and cpu.regs.rbx == 0


def test_a_wrmsr_whose_handler_raised_is_not_made_twice(vm):
    cpu = msr_guest(vm, WRMSR_HLT, MADE_UP)
    calls = []

    def broken(exit):
        calls.append(exit)
        raise RuntimeError("handler bug")

    vm.on_msr(MADE_UP, broken)
    with pytest.raises(RuntimeError):
        cpu.run(timeout=10)
    assert cpu.run(timeout=10) == exits.Hlt(0x1003) and len(calls) == 1


def test_a_handlers_bad_answer_raises_and_the_rdmsr_runs_again(vm):
    cpu = msr_guest(vm, RDMSR_HLT, MADE_UP)
    answers = iter(["not a number", 6])
    vm.on_msr(MADE_UP, lambda exit: next(answers))
    with pytest.raises(pyvt.ArgumentTypeError, match="MSR 0x474f4f00"):
        cpu.run(timeout=10)
    assert cpu.regs.rip == 0x1000
    assert cpu.run(timeout=10) == exits.Hlt(0x1003) and edx_eax(cpu) == 6


def test_on_msr_refuses_what_it_cannot_do(vm):
    vm.on_msr(range(0x10, 0x20), lambda exit: 0)
    with pytest.raises(pyvt.RegionOverlapError):
        vm.on_msr(0x18, lambda exit: 0)
    with pytest.raises(pyvt.ArgumentError, match="x2APIC"):
        vm.on_msr(0x802, lambda exit: 0)
    with pytest.raises(pyvt.ArgumentTypeError):
        vm.on_msr(0x30, "not callable")
    with pytest.raises(pyvt.ArgumentError):
        vm.on_msr(1 << 32, lambda exit: 0)
    with pytest.raises(pyvt.ArgumentError, match="no MSR handler"):
        vm.off_msr(0x11)
    # 16 ranges of KVM's filter: one more scattered MSR is too many.
    for n in range(1, 16):
        vm.on_msr(n * RANGE_MSRS * 2, lambda exit: 0)
    with pytest.raises(pyvt.ArgumentError, match="16"):
        vm.on_msr(16 * RANGE_MSRS * 2, lambda exit: 0)
    vm.on_msr(15 * RANGE_MSRS * 2 + 1, lambda exit: 0)  # shares a range: fine
    vm.off_msr(0x10)
    vm.on_msr(0x18, lambda exit: 0)    # the refused calls left nothing behind


# -- the thin layer and the filter's ranges -------------------------------------------


def test_filter_ranges_pack_nearby_msrs_into_one_range():
    ranges = filter_ranges([(0x10, 1), (0x12, 2), (MADE_UP, 1)])
    assert ranges == [(0x10, 4, READ_WRITE, bytes([0b0010])),
                      (MADE_UP, 1, READ_WRITE, b"\x00")]
    long_one = filter_ranges([(0, RANGE_MSRS + 1)])
    assert [(base, nmsrs) for base, nmsrs, _, _ in long_one] == [(0, RANGE_MSRS), (RANGE_MSRS, 1)]
    assert long_one[0][3] == bytes(RANGE_MSRS // 8)
    assert filter_ranges([]) == []
    with pytest.raises(pyvt.ArgumentError, match="more than 16"):
        filter_ranges([(0, 1 << 32)])


def test_x86_set_msr_filter_checks_its_arguments(vm):
    fd = vm.fd
    with pytest.raises(pyvt.ArgumentTypeError):
        fd.x86_set_msr_filter([(0x10, 1, READ_WRITE)])
    with pytest.raises(pyvt.ArgumentError, match="nmsrs"):
        fd.x86_set_msr_filter([(0x10, 0, READ_WRITE, b"")])
    with pytest.raises(pyvt.ArgumentError, match="flags"):
        fd.x86_set_msr_filter([(0x10, 1, 4, b"\x00")])
    with pytest.raises(pyvt.ArgumentError, match="bitmap of 2 bytes"):
        fd.x86_set_msr_filter([(0x10, 9, READ_WRITE, b"\x00")])
    with pytest.raises(pyvt.ArgumentError, match="outside the range"):
        fd.x86_set_msr_filter([(0x10, 4, READ_WRITE, {0x20})])
    with pytest.raises(pyvt.ArgumentError, match="at most 16"):
        fd.x86_set_msr_filter([(n * 8, 1, READ_WRITE, b"\x00") for n in range(17)])
    with pytest.raises(pyvt.ArgumentError, match="past MSR 0xffffffff"):
        fd.x86_set_msr_filter([(0xFFFFFFFF, 2, READ_WRITE, b"\x00")])
    with pytest.raises(pyvt.KvmError, match="KVM_X86_SET_MSR_FILTER"):
        fd.x86_set_msr_filter(pyvt.kvm.ffi.new("struct kvm_msr_filter *", {"flags": 0x80}))
    fd.x86_set_msr_filter()            # no filter: accepted


def test_x86_set_msr_filter_takes_the_cffi_struct(vm):
    cpu = msr_guest(vm, RDMSR_HLT, MADE_UP)
    ffi = pyvt.kvm.ffi
    bitmap = ffi.new("__u8[8]")        # all zero: denied
    msr_filter = ffi.new("struct kvm_msr_filter *")
    msr_filter.flags = lib.KVM_MSR_FILTER_DEFAULT_ALLOW
    msr_filter.ranges[0] = {"flags": lib.KVM_MSR_FILTER_READ, "nmsrs": 1, "base": MADE_UP,
                            "bitmap": bitmap}
    vm.fd.enable_cap("KVM_CAP_X86_USER_SPACE_MSR", lib.KVM_MSR_EXIT_REASON_FILTER)
    vm.fd.x86_set_msr_filter(msr_filter)
    assert cpu.run(timeout=10) == rdmsr_exit(MADE_UP)
    with pytest.raises(pyvt.ArgumentTypeError):
        vm.fd.x86_set_msr_filter(ffi.new("struct kvm_regs *"))
    with pytest.raises(pyvt.ArgumentError, match="default_deny"):
        vm.fd.x86_set_msr_filter(msr_filter, default_deny=True)


def test_default_deny_sends_every_msr_no_range_allows(vm):
    cpu = msr_guest(vm, RDMSR_HLT, TSC)
    vm.fd.enable_cap("KVM_CAP_X86_USER_SPACE_MSR", lib.KVM_MSR_EXIT_REASON_FILTER)
    vm.fd.x86_set_msr_filter([(MADE_UP, 8, READ_WRITE, {MADE_UP})], default_deny=True)
    assert cpu.run(timeout=10) == rdmsr_exit(TSC)
