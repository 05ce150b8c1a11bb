"""Native devices: UART, debug console (coalesced), isa-debug-exit."""

import os
import subprocess
import sys

import pytest

import pyvt
from pyvt import exits

pytestmark = pytest.mark.requires_kvm


def test_debug_exit_stops_with_qemu_status(vm, load):
    cpu = load("debug_exit", "long")
    exit = cpu.run(timeout=5)
    assert isinstance(exit, exits.DebugExit), exit
    assert (exit.code, exit.status, exit.port) == (0x2A, 85, 0xF4)


def test_debug_exit_port_is_configurable(guest):
    with pyvt.Vm("16M", debug_exit_port=0x501) as vm:
        vm.memory.write(0x1000, guest("debug_exit"))
        cpu = vm.vcpu(0, mode="long")
        cpu.regs.rip = 0x1000
        exit = cpu.run(timeout=5)
        assert isinstance(exit, exits.Io) and exit.port == 0xF4
    with pyvt.Vm("16M", debug_exit_port=None) as vm:
        assert vm.debug_exit is None


def test_uart_input_is_echoed(vm, load):
    assert vm.console.feed(b"ping\n") == 5
    cpu = load("echo", "real")
    exit = cpu.run(timeout=5)
    assert isinstance(exit, exits.Hlt), exit
    assert vm.console.output == b"ping\n"


def test_console_streams_to_a_file(vm, load, tmp_path):
    path = tmp_path / "console.txt"
    with open(path, "wb") as f:
        vm.console.stream(f)
        load("uart_hello_long", "long").run(timeout=5)
    assert path.read_bytes() == b"hello from long mode\n"
    assert vm.console.text == "hello from long mode\n"
    vm.console.clear()
    assert vm.console.output == b""
    with pytest.raises(pyvt.ArgumentError):
        vm.console.stream(object())


def test_debugcon_output_is_byte_exact(vm, load):
    cpu = load("debugcon_flood", "long")
    cpu.regs.rcx = 10000
    exit = cpu.run(timeout=30)
    assert isinstance(exit, exits.Hlt), exit
    expected = bytes(ord("a") + i % 26 for i in range(10000))
    assert vm.debugcon.output == expected
    assert vm.console.output == b"\n"
    if vm.debugcon.coalesced:
        # Most writes never left the kernel: they were queued and replayed.
        assert cpu.stats["coalesced_writes"] > 9000
        assert cpu.stats["kvm_exits"] < 1000


def test_coalesced_output_stays_in_order_with_python_exits(vm, load):
    order = []
    vm.on_io(0x10, lambda e: order.append(("handler", e.value, vm.debugcon.output)))
    cpu = load("interleave", "long")
    assert isinstance(cpu.run(timeout=5), exits.Hlt)
    # When the handler for step i runs, the console holds exactly 0..i.
    assert order == [("handler", i, "".join(str(j) for j in range(i + 1)).encode())
                     for i in range(10)]


def test_detached_console_port_goes_to_python(vm, load):
    vm.console.detach()
    assert not vm.console.attached
    got = []
    vm.on_io(range(0x3F8, 0x400), lambda e: got.append(e.value) if e.is_write else 0x20)
    cpu = load("uart_hello_protected", "protected")
    assert isinstance(cpu.run(timeout=5), exits.Hlt)
    assert bytes(got) == b"hello from protected mode\n"
    assert vm.console.output == b""


def test_console_streams_live_to_stdout_of_a_process(guest, tmp_path):
    image = tmp_path / "hello.bin"
    image.write_bytes(guest("uart_hello_long"))
    code = ("import sys, pyvt; r = pyvt.run(open(sys.argv[1], 'rb').read(), stream=sys.stdout);"
            "print(); print(r.exit)")
    # cwd: outside the checkout, so the child imports the pyvt under test.
    out = subprocess.run([sys.executable, "-c", code, str(image)], capture_output=True,
                         text=True, timeout=60, cwd=os.path.dirname(os.path.dirname(pyvt.__file__)))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("hello from long mode\n")
    assert "Hlt(" in out.stdout
