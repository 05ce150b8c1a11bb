"""Python I/O handlers' bookkeeping and answers: removed handlers are freed,
ids never reach the wrong handler, every bad answer is a pyvt.Error and a
negative answer reaches the guest in two's complement."""

import gc
import sys
import threading
import time
import weakref

import pytest

import pyvt
from pyvt import exits

pytestmark = pytest.mark.requires_kvm

MMIO = 0xD0000000

# out 0x10 <- 0x5a; ebx <- in 0x10; esi <- in 0x11; rdi <- 8-byte MMIO read.
TOUCH_ALL = f"""
.code64
.globl _start
_start:
    mov $0x10, %dx
    mov $0x5a, %al
    out %al, (%dx)
    in (%dx), %eax
    mov %eax, %ebx
    mov $0x11, %dx
    in (%dx), %eax
    mov %eax, %esi
    mov ${MMIO:#x}, %rcx
    mov (%rcx), %rdi
    hlt
"""

# One read of each width: r8 <- 1-byte in, r9 <- 2-byte in, r10 <- 4-byte in,
# r11 <- 8-byte MMIO read (each zero-extended from what was read).
READ_EACH_WIDTH = f"""
.code64
.globl _start
_start:
    mov $0x10, %dx
    xor %eax, %eax
    inb (%dx), %al
    mov %rax, %r8
    xor %eax, %eax
    inw (%dx), %ax
    mov %rax, %r9
    in (%dx), %eax
    mov %rax, %r10
    mov ${MMIO:#x}, %rcx
    mov (%rcx), %r11
    hlt
"""

IN_DWORD = """
.code64
.globl _start
_start:
    mov $0x10, %dx
    in (%dx), %eax
    hlt
"""

# Spins reading port 0x11 until it reads 0xffffffff, then stops.
POLL_UNTIL_ALL_ONES = """
.code64
.globl _start
_start:
    mov $0x11, %dx
1:  in (%dx), %eax
    cmp $0xffffffff, %eax
    jne 1b
    hlt
"""


def _cpu(vm, source):
    vm.memory.write(0x1000, pyvt.assemble(source, at=0x1000))
    cpu = vm.vcpu(0, mode="long")
    cpu.regs.rip = 0x1000
    return cpu


class Holder:
    """A handler holding state, as a real device model would."""

    def __init__(self):
        self.state = bytearray(1 << 16)

    def __call__(self, exit):
        return None if exit.is_write else 0


def test_removed_handlers_are_freed(vm):
    port_handler, mmio_handler = Holder(), Holder()
    refs = [weakref.ref(port_handler), weakref.ref(mmio_handler)]
    vm.on_io(0x20, port_handler)
    vm.on_mmio(MMIO, mmio_handler)
    vm.off_io(0x20)
    vm.off_mmio(MMIO)
    del port_handler, mmio_handler
    gc.collect()
    assert [ref() for ref in refs] == [None, None]
    # Many on/off cycles keep nothing either.
    cycled = []
    for _ in range(50):
        handler = Holder()
        cycled.append(weakref.ref(handler))
        vm.on_io(0x20, handler)
        vm.off_io(0x20)
    del handler
    gc.collect()
    assert all(ref() is None for ref in cycled)
    assert len(vm._machine.handlers) == 0


def test_re_registered_handlers_get_the_right_calls(vm):
    cpu = _cpu(vm, TOUCH_ALL)
    calls = []

    def make(name, value):
        def handler(exit):
            calls.append((name, exit.port if isinstance(exit, exits.Io) else exit.address,
                          exit.is_write))
            return None if exit.is_write else value
        return handler

    for generation in range(4):
        # Removal and re-adding in a different order each time, with a
        # handler elsewhere coming and going in between.
        vm.on_io(0x30, make("spare", 0))
        if generation % 2:
            vm.on_mmio((MMIO, 8), make(f"mmio{generation}", 0x1111111100000000 + generation))
            vm.on_io(0x11, make(f"b{generation}", 0xB0 + generation))
            vm.on_io(0x10, make(f"a{generation}", 0xA0 + generation))
        else:
            vm.on_io(0x10, make(f"a{generation}", 0xA0 + generation))
            vm.on_io(0x11, make(f"b{generation}", 0xB0 + generation))
            vm.on_mmio((MMIO, 8), make(f"mmio{generation}", 0x1111111100000000 + generation))
        vm.off_io(0x30)
        calls.clear()
        cpu.regs.rip = 0x1000
        assert isinstance(cpu.run(timeout=10), exits.Hlt)
        assert calls == [(f"a{generation}", 0x10, True), (f"a{generation}", 0x10, False),
                         (f"b{generation}", 0x11, False), (f"mmio{generation}", MMIO, False)]
        regs = cpu.regs
        assert (regs.rbx, regs.rsi, regs.rdi) == \
            (0xA0 + generation, 0xB0 + generation, 0x1111111100000000 + generation)
        vm.off_io(0x10)
        vm.off_io(0x11)
        vm.off_mmio(MMIO)
    assert len(vm._machine.handlers) == 0


def test_a_handler_removed_while_a_vcpu_exits_to_it_answers_as_an_empty_bus(vm):
    # The race: a vCPU thread has exited for port 0x11 (its handler's id
    # looked up in C) and waits for the GIL while this thread removes the
    # handler and adds another.  That access must reach neither the newer
    # handler nor a KeyError: it reads as from an empty bus (all ones).
    cpu = _cpu(vm, POLL_UNTIL_ALL_ONES)
    entered = threading.Event()
    exits_at_call = []
    newer_calls = []

    # The run loop's own counter, read without a syscall: cpu.stats also
    # preads KVM's stats fd, which lets the vCPU thread take the GIL.
    def kvm_exits():
        return cpu._run_loop_stats()["kvm_exits"]

    def first(exit):
        exits_at_call.append(kvm_exits())
        entered.set()
        return 0

    def newer(exit):
        newer_calls.append(exit)
        return -1

    vm.on_io(0x11, first)
    result = []
    runner = threading.Thread(target=lambda: result.append(cpu.run(timeout=60)))
    interval = sys.getswitchinterval()
    try:
        runner.start()
        assert entered.wait(60), "the guest never reached the handler"
        # From here this thread keeps the GIL until it joins: the vCPU thread
        # can exit again, but not call a handler.
        sys.setswitchinterval(1000)
        deadline = time.monotonic() + 60
        while kvm_exits() == exits_at_call[-1]:
            assert time.monotonic() < deadline, "the vCPU never exited again"
        settle = time.monotonic() + 0.05
        while time.monotonic() < settle:
            pass  # let it finish the bus lookup that follows the exit
        vm.off_io(0x11)
        vm.on_io(0x11, newer)
    finally:
        sys.setswitchinterval(interval)
    runner.join(60)
    assert not runner.is_alive()
    assert isinstance(result[0], exits.Hlt), result
    assert cpu.regs.rax & 0xFFFFFFFF == 0xFFFFFFFF
    assert newer_calls == []


BAD_ANSWERS = pytest.mark.parametrize("answer,error", [
    (None, pyvt.ArgumentTypeError), ("x", pyvt.ArgumentTypeError),
    (1.5, pyvt.ArgumentTypeError), ([1], pyvt.ArgumentTypeError),
    (True, pyvt.ArgumentTypeError), (1 << 32, pyvt.ArgumentError),
    (-(1 << 31) - 1, pyvt.ArgumentError), (-(1 << 40), pyvt.ArgumentError),
    (b"abc", pyvt.ArgumentError),
])


@BAD_ANSWERS
def test_bad_handler_answers_raise_pyvt_errors(vm, answer, error):
    cpu = _cpu(vm, IN_DWORD)
    vm.on_io(0x10, lambda e: answer)
    with pytest.raises(error, match="port 0x10") as info:
        cpu.run(timeout=10)
    # Still what Python itself would raise, for code that catches that.
    assert isinstance(info.value, TypeError if error is pyvt.ArgumentTypeError else ValueError)


@BAD_ANSWERS
def test_bad_replies_raise_pyvt_errors(vm, answer, error):
    cpu = _cpu(vm, IN_DWORD)
    pending = cpu.run(timeout=10)
    assert (pending.port, pending.size, pending.direction) == (0x10, 4, "in")
    with pytest.raises(error, match="reply\\(\\) to port 0x10") as info:
        cpu.reply(answer)
    assert isinstance(info.value, TypeError if error is pyvt.ArgumentTypeError else ValueError)
    cpu.reply(0x1234)  # the refused reply changed nothing
    assert isinstance(cpu.run(timeout=10), exits.Hlt)
    assert cpu.regs.rax & 0xFFFFFFFF == 0x1234


@pytest.mark.parametrize("answer_for_size", [
    lambda size: -1,
    lambda size: -(1 << (8 * size - 1)),
    lambda size: b"\xfe" * size,
    lambda size: (1 << (8 * size)) - 2,
], ids=["minus-one", "most-negative", "bytes", "largest-unsigned"])
def test_answers_reach_the_guest_at_every_width(vm, answer_for_size):
    cpu = _cpu(vm, READ_EACH_WIDTH)
    vm.on_io(0x10, lambda e: answer_for_size(e.size))
    vm.on_mmio((MMIO, 8), lambda e: answer_for_size(e.size))
    assert isinstance(cpu.run(timeout=10), exits.Hlt)
    regs = cpu.regs

    def expected(size):
        answer = answer_for_size(size)
        if isinstance(answer, bytes):
            return int.from_bytes(answer, "little")
        return answer & ((1 << (8 * size)) - 1)  # two's complement at that width

    assert [regs.r8, regs.r9, regs.r10, regs.r11] == [expected(s) for s in (1, 2, 4, 8)]


def test_reply_minus_one_reads_all_ones(vm):
    cpu = _cpu(vm, IN_DWORD)
    pending = cpu.run(timeout=10)
    assert (pending.port, pending.size, pending.direction) == (0x10, 4, "in")
    cpu.reply(-1)
    assert isinstance(cpu.run(timeout=10), exits.Hlt)
    assert cpu.regs.rax & 0xFFFFFFFF == 0xFFFFFFFF
