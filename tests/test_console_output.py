"""Captured console output: a bounded buffer keeping the last part, complete
streams, and streams that only ever reach the file the user passed."""

import os

import pytest

import pyvt
from pyvt import exits

pytestmark = pytest.mark.requires_kvm

LOAD_ADDRESS = 0x1000

# Long mode: %rcx times, one letter to the debug console (a, b, c...) then its
# capital to the UART (A, B, C...), cycling through the alphabet; then hlt.
INTERLEAVE = """
    .code64
    .globl _start
_start:
    xor     %ebx, %ebx
1:  test    %rcx, %rcx
    jz      3f
    mov     %bl, %al
    add     $'a', %al
    out     %al, $0xe9
    mov     %bl, %al
    add     $'A', %al
    mov     $0x3f8, %dx
    out     %al, %dx
    inc     %bl
    cmp     $26, %bl
    jb      2f
    xor     %bl, %bl
2:  dec     %rcx
    jmp     1b
3:  hlt
"""


@pytest.fixture(scope="module")
def interleave_code():
    return pyvt.assemble(INTERLEAVE, at=LOAD_ADDRESS)


def letters(first: str, count: int) -> bytes:
    return bytes(ord(first) + i % 26 for i in range(count))


def interleaved(count: int) -> bytes:
    lower, upper = letters("a", count), letters("A", count)
    return bytes(b for pair in zip(lower, upper, strict=True) for b in pair)


def run_guest(vm, code: bytes, count: int) -> None:
    """Writes `count` letters to each console, on vCPU 0 (made on first use)."""
    vm.memory.write(LOAD_ADDRESS, code)
    cpu = vm.vcpus.get(0) or vm.vcpu(0, mode="long")
    cpu.regs.rip = LOAD_ADDRESS
    cpu.regs.rcx = count
    exit = cpu.run(timeout=60)
    assert isinstance(exit, exits.Hlt), exit


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_default_limit_is_the_last_mib():
    with pyvt.Vm("16M") as vm:
        assert vm.console.limit == vm.debugcon.limit == pyvt.devices.DEFAULT_OUTPUT_LIMIT == 1 << 20
        assert vm.console.dropped == vm.debugcon.dropped == 0


def test_streams_get_every_byte_in_order_while_only_the_last_part_is_kept(
        vm, interleave_code, tmp_path):
    # Limits that do not divide the output: the rings wrap at odd places.
    vm.console.limit = 777
    vm.debugcon.limit = 1000
    path = tmp_path / "both.txt"
    with open(path, "wb") as f:
        vm.console.stream(f)
        vm.debugcon.stream(f)
    # f is closed: pyvt streams to its own duplicate of the descriptor.
    run_guest(vm, interleave_code, 5000)
    assert path.read_bytes() == interleaved(5000)
    assert vm.debugcon.output == letters("a", 5000)[-1000:]
    assert vm.debugcon.dropped == 4000
    assert vm.console.output == letters("A", 5000)[-777:]
    assert vm.console.dropped == 5000 - 777
    assert "dropped" in repr(vm.console)


@pytest.mark.parametrize("port", [0xE9, 0x3F8], ids=["debugcon", "uart"])
def test_flood_beyond_the_default_limit_keeps_its_last_mib_and_streams_it_all(vm, port, tmp_path):
    size = (1 << 20) + 12345
    data = os.urandom(size)
    vm.memory.write(0x100000, data)
    vm.memory.write(LOAD_ADDRESS, pyvt.assemble(f"""
        .code64
        .globl _start
    _start:
        mov     ${port}, %dx
        mov     $0x100000, %rsi
        mov     ${size}, %rcx
        rep outsb
        hlt
    """, at=LOAD_ADDRESS))
    console = vm.debugcon if port == 0xE9 else vm.console
    path = tmp_path / "flood.bin"
    with open(path, "wb") as f:
        console.stream(f)
    cpu = vm.vcpu(0, mode="long")
    cpu.regs.rip = LOAD_ADDRESS
    exit = cpu.run(timeout=120)
    assert isinstance(exit, exits.Hlt), exit
    assert path.read_bytes() == data
    assert console.output == data[-(1 << 20):]
    assert console.dropped == 12345


def test_limit_can_be_changed_none_keeps_everything(interleave_code):
    with pyvt.Vm("16M", output_limit=None) as vm:
        assert vm.debugcon.limit is None
        run_guest(vm, interleave_code, 3000)
        assert vm.debugcon.output == letters("a", 3000)
        assert vm.debugcon.dropped == 0

        vm.debugcon.limit = 100  # keeps the last 100 bytes there are
        assert vm.debugcon.output == letters("a", 3000)[-100:]
        assert vm.debugcon.dropped == 2900
        vm.debugcon.limit = None  # keeps what there is, and all that comes
        run_guest(vm, interleave_code, 10)
        assert vm.debugcon.output == letters("a", 3000)[-100:] + letters("a", 10)
        assert vm.debugcon.dropped == 2900

        vm.debugcon.clear()
        assert (vm.debugcon.output, vm.debugcon.dropped) == (b"", 0)
        vm.debugcon.limit = 0  # keeps nothing, still counts
        run_guest(vm, interleave_code, 50)
        assert (vm.debugcon.output, vm.debugcon.dropped) == (b"", 50)
        assert vm.console.output == letters("A", 3000) + letters("A", 10) + letters("A", 50)


@pytest.mark.parametrize("bad", [-1, 1.5, "1M", True])
def test_bad_limit_is_refused_and_changes_nothing(vm, bad):
    with pytest.raises(pyvt.ArgumentError, match="output limit"):
        vm.console.limit = bad
    assert vm.console.limit == 1 << 20
    with pytest.raises(pyvt.ArgumentError, match="output limit"):
        pyvt.Vm("16M", output_limit=bad)


def test_restore_keeps_the_last_limit_bytes_of_the_snapshot_output(interleave_code):
    with pyvt.Vm("16M", output_limit=None) as vm:
        run_guest(vm, interleave_code, 3000)
        snap = vm.snapshot()
        try:
            vm.console.clear()
            vm.debugcon.limit = 500
            vm.restore(snap)
            assert vm.debugcon.output == letters("a", 3000)[-500:]
            assert vm.debugcon.dropped == 2500
            assert vm.console.output == letters("A", 3000)
            assert vm.console.dropped == 0
        finally:
            snap.close()


def test_closed_stream_file_number_reused_gets_no_output(vm, interleave_code, tmp_path):
    streamed, unrelated = tmp_path / "streamed.txt", tmp_path / "unrelated.txt"
    f = open(streamed, "wb")
    number = f.fileno()
    vm.debugcon.stream(f)
    f.close()
    # A file the user never passed to stream() now has that number.
    fd = os.open(unrelated, os.O_WRONLY | os.O_CREAT)
    if fd != number:
        os.dup2(fd, number)
        os.close(fd)
    try:
        run_guest(vm, interleave_code, 100)
    finally:
        os.close(number)
    assert unrelated.read_bytes() == b""
    assert streamed.read_bytes() == letters("a", 100)


def test_stream_duplicates_are_closed_when_streaming_stops_or_moves(vm, interleave_code, tmp_path):
    run_guest(vm, interleave_code, 1)  # the vCPU's own fds exist from here on
    before = open_fds()
    for i in range(50):
        with open(tmp_path / f"{i % 3}.txt", "ab") as f:
            vm.console.stream(f)   # replaces the previous stream, if any
            vm.debugcon.stream(f.fileno())
        if i % 2:
            vm.console.stream(None)
            vm.debugcon.stream(None)
        run_guest(vm, interleave_code, 1)
    vm.console.stream(None)
    vm.debugcon.stream(None)
    assert open_fds() == before
    written = b"".join((tmp_path / f"{i}.txt").read_bytes() for i in range(3))
    assert written.count(b"aA") == 25  # the iterations that still streamed


def test_closing_the_vm_closes_its_stream_duplicates(interleave_code):
    before = open_fds()
    read_end, write_end = os.pipe()
    try:
        for _ in range(5):
            with pyvt.Vm("16M") as vm:
                vm.console.stream(write_end)
                vm.debugcon.stream(write_end)
                run_guest(vm, interleave_code, 2)
        os.close(write_end)
        # Only pyvt's duplicates could keep the pipe open: EOF means none is.
        os.set_blocking(read_end, False)
        got = b""
        while True:
            chunk = os.read(read_end, 4096)  # BlockingIOError if a copy leaked
            if not chunk:
                break
            got += chunk
    finally:
        os.close(read_end)
    assert got == interleaved(2) * 5
    assert open_fds() == before


def test_stream_refuses_what_is_not_an_open_descriptor(vm, tmp_path):
    f = open(tmp_path / "closed.txt", "wb")
    closed_number = f.fileno()
    f.close()
    for target in (f, closed_number, -1, 1 << 40, object()):
        with pytest.raises(pyvt.ArgumentError, match="cannot stream to"):
            vm.debugcon.stream(target)
    vm.close()
    with pytest.raises(pyvt.ClosedError):
        vm.console.stream("stdout")
    vm.console.stream(None)  # stopping is always fine
