"""The gdb stub against a real gdb (batch mode), in real, protected and
long mode, plus the debugging API it is built on (cpu.step, vm.breakpoints,
vm.watchpoints).  gdb comes from Debian's ``gdb`` package (CI installs it)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

import pyvt
from pyvt import exits

GDB = shutil.which("gdb")
needs_gdb = pytest.mark.skipif(GDB is None, reason="gdb is not installed (apt-get install gdb)")
# Everything here drives KVM_SET_GUEST_DEBUG, which pyvt.ko lacks.
pytestmark = pytest.mark.requires_cap("SET_GUEST_DEBUG")
# Children import the pyvt under test (installed or in place), never an
# unbuilt checkout: they start beside the package this process imported.
PACKAGE_PARENT = os.path.dirname(os.path.dirname(pyvt.__file__))

# One guest for every mode: two moves, a store the watchpoint sees, a load,
# then isa-debug-exit with code 0x21 (status 67).  Labels sit at fixed
# offsets so that the tests can name them.
GUEST = """
.code{bits}
_start:
    mov $1, %eax
    mov $2, %ebx
target:
    mov $3, %ecx
    movl $5, 0x3000
    movl 0x3000, %edx
    mov $0x21, %al
    out %al, $0xf4
"""


def _vm_with_guest(mode: str, cpus: int = 1, source: str = GUEST):
    bits = {"real": 16, "protected": 32, "long": 64}[mode]
    code = pyvt.assemble(source.format(bits=bits))
    vm = pyvt.Vm("2M")
    vm.memory.write(0x1000, code)
    for index in range(cpus):
        cpu = vm.vcpu(index, mode=mode)
        if mode == "real":
            cpu.sregs.cs.selector = 0
            cpu.sregs.cs.base = 0
        cpu.regs.rip = 0x1000
    return vm, code


def _target_offset(code: bytes, mode: str) -> int:
    """The address of `target:` (after two moves; their size depends on the mode)."""
    return 0x1000 + {"real": 12, "protected": 10, "long": 10}[mode]


def _gdb(port: int, *commands: str, timeout: float = 60) -> str:
    argv = [GDB, "-nx", "-batch", "-ex", "set pagination off",
            "-ex", f"target remote 127.0.0.1:{port}"]
    for command in commands:
        argv += ["-ex", command]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    return done.stdout + done.stderr


@needs_gdb
@pytest.mark.parametrize("mode", ["real", "protected", "long"])
def test_break_stepi_registers_memory_watchpoint_and_exit(mode):
    vm, code = _vm_with_guest(mode)
    with vm:
        target = _target_offset(code, mode)
        server = vm.gdb_server(("127.0.0.1", 0), wait=False)
        out = _gdb(server.address[1],
                   "stepi", "p/x $pc",
                   f"break *{target:#x}", "continue", "p/x $pc", "p $rax & 0xff",
                   "set $rbx = 0x55", "p/x $rbx",
                   "set {char}0x3004 = 0x7a", "x/1xb 0x3004",
                   "delete", "watch *(int*)0x3000", "continue", "p $rdx & 0xff",
                   "delete", "continue")
        server.join(30)
        assert "$1 = 0x" in out and f"$2 = {hex(target)}" in out, out
        assert "Breakpoint 1, " in out, out
        assert "$3 = 1" in out and "$4 = 0x55" in out, out
        assert "0x3004:\t0x7a" in out, out
        assert "Old value = 0" in out and "New value = 5" in out, out
        assert "exited with code 0103" in out, out
        assert isinstance(server.final_exit, exits.DebugExit)
        assert server.final_exit.status == 67
        # gdb's writes reached the guest: rbx stayed 0x55, the byte is there.
        assert vm.vcpus[0].regs.rbx == 0x55
        assert vm.memory.read(0x3004, 1) == b"\x7a"


@needs_gdb
def test_hbreak_and_stepi_count():
    vm, code = _vm_with_guest("long")
    with vm:
        target = _target_offset(code, "long")
        server = vm.gdb_server(("127.0.0.1", 0), wait=False)
        out = _gdb(server.address[1], f"hbreak *{target:#x}", "continue", "p/x $pc",
                   "stepi", "p/x $pc", "p $rcx", "kill")
        server.join(30)
        assert "Hardware assisted breakpoint 1" in out, out
        assert f"$1 = {hex(target)}" in out and f"$2 = {hex(target + 5)}" in out, out
        assert "$3 = 3" in out, out
        assert server.outcome == "killed"


@needs_gdb
def test_threads_are_vcpus():
    spin = """
.code{bits}
_start:
    cmpl $0, 0x3100
    je _start
    mov $0x21, %al
    out %al, $0xf4
"""
    vm, _ = _vm_with_guest("long", cpus=2, source=spin)
    with vm:
        vm.vcpus[1].regs.rbx = 0x4242
        server = vm.gdb_server(("127.0.0.1", 0), wait=False)
        out = _gdb(server.address[1], "info threads", "thread 2", "p/x $rbx",
                   "thread 1", "p/x $rbx", "detach")
        server.join(30)
        assert "Thread 1" in out and "Thread 2" in out, out
        assert "$1 = 0x4242" in out and "$2 = 0x0" in out, out
        assert server.outcome == "detached"


def _connect(port: int) -> socket.socket:
    conn = socket.create_connection(("127.0.0.1", port), timeout=20)
    return conn


def _exchange(conn: socket.socket, payload: bytes) -> bytes:
    from pyvt.gdbstub import frame

    conn.sendall(frame(payload))
    return _reply(conn)


def _reply(conn: socket.socket) -> bytes:
    data = b""
    while b"#" not in data or len(data) < data.index(b"#") + 3:
        chunk = conn.recv(4096)
        assert chunk, "the stub closed the connection"
        data += chunk
    body = data[data.index(b"$") + 1:data.index(b"#")]
    return body


def test_ctrl_c_stops_a_spinning_guest():
    vm, _ = _vm_with_guest("long", source=".code{bits}\n_start: jmp _start\n")
    with vm:
        server = vm.gdb_server(("127.0.0.1", 0), wait=False)
        with _connect(server.address[1]) as conn:
            assert _exchange(conn, b"?") == b"T05thread:1;"
            conn.sendall(b"+")
            from pyvt.gdbstub import frame

            conn.sendall(frame(b"c"))
            time.sleep(0.5)
            conn.sendall(b"\x03")
            reply = _reply(conn)
            assert reply == b"T02thread:1;", reply
            conn.sendall(b"+")
            assert _exchange(conn, b"p10") == (0x1000).to_bytes(8, "little").hex().encode()
            assert _exchange(conn, b"D") == b"OK"
        server.join(10)
        assert server.outcome == "detached"


def test_bad_packets_get_error_replies_not_a_crash():
    vm, _ = _vm_with_guest("long")
    with vm:
        server = vm.gdb_server(("127.0.0.1", 0), wait=False)
        with _connect(server.address[1]) as conn:
            conn.sendall(b"$g#00")  # wrong checksum
            assert conn.recv(1) == b"-"
            for packet, expected in [(b"mzz,4", b"E16"), (b"m1000", b"E16"),
                                     (b"m7fffffff000,4", b"E14"), (b"pfff", b"E16"),
                                     (b"Hg99", b"E16"), (b"Z9,1000,1", b""),
                                     (b"P0=12", b"E16"), (b"qUnknown", b"")]:
                assert _exchange(conn, packet) == expected, packet
            assert _exchange(conn, b"m1000,1") == b"b8"  # mov $1, %eax
            conn.sendall(b"$k#6b")
        server.join(10)
        assert server.outcome == "killed"


def test_all_four_debug_registers_taken_is_a_clear_error():
    vm, _ = _vm_with_guest("long")
    with vm:
        for i in range(4):
            vm.breakpoints.add(0x2000 + i, kind="hw")
        with pytest.raises(pyvt.Error, match=r"DR0-DR3 are all taken \(DR0: breakpoint at 0x2000"):
            vm.breakpoints.add(0x1000, kind="hw")
        with pytest.raises(pyvt.Error, match="DR0-DR3 are all taken"):
            vm.breakpoints.add(0x1000, kind="sw") if not vm.debugger.support.int3 else \
                vm.breakpoints.add(0x1000, kind="hw")
        if vm.debugger.support.data_breakpoints:
            with pytest.raises(pyvt.Error, match="DR0-DR3 are all taken"):
                vm.watchpoints.add(0x3000, 4)
        vm.breakpoints.remove(0x2003)
        assert vm.breakpoints.add(0x1000, kind="hw").slot == 3  # the freed register
        assert sorted(b.address for b in vm.breakpoints) == [0x1000, 0x2000, 0x2001, 0x2002]


def test_step_breakpoint_watchpoint_api():
    vm, code = _vm_with_guest("long")
    with vm:
        cpu = vm.vcpus[0]
        target = _target_offset(code, "long")
        first = cpu.step()
        assert isinstance(first, exits.Debug) and first.step and cpu.regs.rip == 0x1005
        vm.breakpoints.add(target)  # "sw": int3, or the fallback on this host
        hit = vm.debugger.resume(cpu)
        assert isinstance(hit, exits.Debug) and hit.breakpoint == target, hit
        assert cpu.regs.rip == target
        vm.breakpoints.remove(target)
        assert vm.memory.read(target, 1) == code[target - 0x1000:target - 0xFFF]
        vm.watchpoints.add(0x3000, 4, access="w")
        hit = vm.debugger.resume(cpu)
        assert isinstance(hit, exits.Debug) and hit.watchpoint == 0x3000, hit
        assert vm.memory.read(0x3000, 4) == (5).to_bytes(4, "little")
        vm.watchpoints.remove(0x3000)
        end = vm.debugger.resume(cpu)
        assert isinstance(end, exits.DebugExit) and end.status == 67


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@needs_gdb
def test_cli_run_under_gdb_exits_with_the_guest_status(tmp_path):
    source = tmp_path / "guest.S"
    source.write_text(GUEST.format(bits=64))
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=PACKAGE_PARENT)
    pyvt_process = subprocess.Popen(
        [sys.executable, "-m", "pyvt", "run", str(source), "--gdb", f"127.0.0.1:{port}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=PACKAGE_PARENT)
    try:
        for _ in range(200):  # until it listens
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            except OSError:
                time.sleep(0.05)
            else:
                break
    except BaseException:
        pyvt_process.kill()
        raise
    # The probe connection above was the stub's one gdb: it went away, so
    # the guest ran on without a debugger, as after a detach.
    out, err = pyvt_process.communicate(timeout=60)
    assert pyvt_process.returncode == 67, err
    assert "the guest runs on" in err


def _pyvt_under_gdb(args, *gdb_commands):
    """Runs ``pyvt ARGS --gdb PORT`` and gdb against it; returns (pyvt's
    status, its stderr, gdb's output)."""
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=PACKAGE_PARENT)
    process = subprocess.Popen([sys.executable, "-m", "pyvt", *map(str, args), "--gdb", str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=env, stdin=subprocess.DEVNULL, cwd=PACKAGE_PARENT)
    try:
        deadline = time.monotonic() + 30
        err = ""
        while "waiting for gdb" not in err:
            line = process.stderr.readline()
            assert line and time.monotonic() < deadline, f"pyvt never listened: {err}"
            err += line
        out = _gdb(port, *gdb_commands)
        _, rest = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    return process.returncode, err + rest, out


@needs_gdb
def test_cli_run_gdb_continue_to_the_end(tmp_path):
    source = tmp_path / "guest.S"
    source.write_text(GUEST.format(bits=64))
    status, err, out = _pyvt_under_gdb(["run", source], "stepi", "break *0x100a",
                                       "continue", "continue")
    assert "Breakpoint 1, 0x000000000000100a" in out, out
    assert "exited with code 0103" in out, out
    assert status == 67, err
    assert "DebugExit(code=0x21, status=67" in err


@needs_gdb
def test_ctrl_c_from_gdb_stops_a_spinning_guest(tmp_path):
    """gdb's own Ctrl-C: a SIGINT to gdb while it waits in `continue`."""
    source = tmp_path / "spin.S"
    source.write_text("_start: jmp _start\n")
    status, err, out = _pyvt_under_gdb(
        ["run", source],
        "python import threading, os, signal; "
        "threading.Timer(1.0, lambda: os.kill(os.getpid(), signal.SIGINT)).start()",
        "continue", "p/x $pc", "kill")
    assert "Program received signal SIGINT" in out and "$1 = 0x1000" in out, out
    assert status == 1 and "Stopped(rip=0x1000)" in err, err


def _kernel(tmp_path, name):
    from kernelbuild import build_kernel, toolchain_missing

    missing = toolchain_missing()
    if missing:
        pytest.skip(f"cannot build test kernels: {missing}")
    return build_kernel(name, tmp_path)


@needs_gdb
@pytest.mark.requires_cap("IRQCHIP")
def test_cli_boot_smp_under_gdb_shows_both_vcpus_and_keeps_the_status(tmp_path):
    kernel = _kernel(tmp_path, "smp")
    status, err, out = _pyvt_under_gdb(
        ["boot", kernel, "--smp", 2, "--memory", "32M", "--append", "ap-exit", "--no-stdin"],
        "info threads", "thread 2", "p $rip", "continue")
    assert "Thread 1 (vCPU 0)" in out and "Thread 2 (vCPU 1)" in out, out
    assert "exited with code 013" in out, out  # debug-exit code 5: status 11
    assert status == 11, err
