"""Timeouts, Ctrl-C, stopping from another thread, several vCPUs at once."""

import os
import signal
import threading
import time

import pytest
from threadwait import wait_until_running

import pyvt
from pyvt import exits

pytestmark = pytest.mark.requires_kvm


def test_timeout_stops_a_spinning_guest_and_it_can_resume(vm, load):
    cpu = load("spin", "long")
    exit = cpu.run(timeout=0.2)
    assert isinstance(exit, exits.Timeout)
    assert exit.rip == 0x1000 and exit.timeout == 0.2
    assert isinstance(cpu.run(timeout=0.05), exits.Timeout)
    assert isinstance(cpu.run(timeout=0), exits.Timeout)


def test_timeout_while_native_exits_keep_coming(vm, load):
    # The UART guest with a huge string would loop forever on LSR polls if
    # the port never changed; here the echo guest waits for input that never
    # comes: every iteration is a native exit, none reaches Python.
    cpu = load("echo", "real")
    exit = cpu.run(timeout=0.2)
    assert isinstance(exit, exits.Timeout)
    assert cpu.stats["native_exits"] > 0
    vm.console.feed(b"late\n")
    assert isinstance(cpu.run(timeout=5), exits.Hlt)
    assert vm.console.output == b"late\n"


def test_ctrl_c_interrupts_promptly_and_vm_stays_usable(vm, load):
    cpu = load("spin", "long")
    timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        cpu.run(timeout=30)
    assert time.monotonic() - started < 20  # not the 30 s timeout
    timer.join()
    assert isinstance(cpu.run(timeout=0.05), exits.Timeout)
    cpu.regs.rip = 0x2000
    vm.memory.write(0x2000, b"\xf4")
    assert isinstance(cpu.run(timeout=5), exits.Hlt)


def test_ctrl_c_without_timeout(vm, load):
    cpu = load("spin", "long")
    timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        cpu.run()
    timer.join()


def test_stop_from_another_thread(vm, load):
    cpu = load("spin", "long")
    result = []
    thread = threading.Thread(target=lambda: result.append(cpu.run()))
    thread.start()
    wait_until_running(cpu)
    cpu.stop()
    thread.join(10)
    assert not thread.is_alive()
    assert isinstance(result[0], exits.Stopped)


def test_running_the_same_vcpu_twice_at_once_is_refused(vm, load):
    cpu = load("spin", "long")
    thread = threading.Thread(target=lambda: cpu.run(timeout=60))
    thread.start()
    wait_until_running(cpu)
    with pytest.raises(pyvt.Error, match="already running"):
        cpu.run(timeout=0.1)
    cpu.stop()
    thread.join()


def test_close_stops_vcpus_running_in_other_threads(guest):
    vm = pyvt.Vm("16M")
    vm.memory.write(0x1000, guest("spin"))
    cpu = vm.vcpu(0, mode="long")
    cpu.regs.rip = 0x1000
    result = []
    thread = threading.Thread(target=lambda: result.append(cpu.run()))
    thread.start()
    wait_until_running(cpu)
    vm.close()
    thread.join(10)
    assert isinstance(result[0], exits.Stopped)
    with pytest.raises(pyvt.ClosedError):
        cpu.run()


def test_close_from_a_handler(vm, load):
    vm.on_io(0x10, lambda e: vm.close())
    cpu = load("port_io", "protected")
    assert isinstance(cpu.run(timeout=5), exits.Stopped)
    assert vm.closed and cpu.closed


def test_vcpus_run_in_parallel_threads(guest):
    count = 4
    with pyvt.Vm("16M") as vm:
        vm.memory.write(0x1000, guest("counter"))
        cpus = [vm.vcpu(i, mode="long") for i in range(count)]
        for i, cpu in enumerate(cpus):
            cpu.regs.rip = 0x1000
            cpu.regs.rdi = i
            cpu.regs.rsi = 2_000_000
        results = [None] * count
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, cpus[i].run(timeout=30)))
                   for i in range(count)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(isinstance(r, exits.Hlt) for r in results), results
        assert [vm.memory.read_int(0x5000 + 8 * i) for i in range(count)] == \
            [i * 1000 + 7 for i in range(count)]


def test_python_handlers_from_several_vcpu_threads(guest):
    with pyvt.Vm("16M") as vm:
        lock = threading.Lock()
        seen = []

        def record(exit):
            with lock:
                seen.append((threading.get_ident(), exit.value))

        vm.on_io(0x10, record)
        vm.on_io(0x11, lambda e: 1)
        vm.on_io(0x12, lambda e: None)
        vm.on_io(0x13, lambda e: 2)
        vm.memory.write(0x1000, guest("port_io"))
        cpus = [vm.vcpu(i, mode="protected") for i in range(2)]
        for cpu in cpus:
            cpu.regs.rip = 0x1000
        results = {}
        threads = [threading.Thread(target=lambda c=cpu: results.__setitem__(c.index, c.run(timeout=30)))
                   for cpu in cpus]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(isinstance(r, exits.Hlt) for r in results.values()), results
        assert sorted(v for _, v in seen) == [1, 1, 2, 2, 3, 3]
        # Handlers ran on the vCPU threads, not on this one.
        assert threading.get_ident() not in {tid for tid, _ in seen}


def test_stop_on_an_idle_vcpu_does_nothing(vm, load):
    vm.memory.write(0x1000, pyvt.assemble(".code64\n.globl _start\n_start: inc %rax\n hlt\n"))
    cpu = vm.vcpu(0, mode="long")
    cpu.regs.rip = 0x1000
    cpu.stop()
    assert cpu.run(timeout=10) == exits.Hlt(0x1004)
    assert cpu.regs.rax == 1


@pytest.mark.parametrize("timeout", [float("inf"), 1e30, 2e10, 10**400])
def test_huge_and_infinite_timeouts_mean_no_limit(vm, load, timeout):
    cpu = load("spin", "long")
    result = []
    thread = threading.Thread(target=lambda: result.append(cpu.run(timeout=timeout)))
    thread.start()
    wait_until_running(cpu)
    time.sleep(0.2)
    cpu.stop()
    thread.join(10)
    assert isinstance(result[0], exits.Stopped), result  # it ran until stopped


@pytest.mark.parametrize("timeout", [float("nan"), -1, -0.5, float("-inf"), "1", True])
def test_bad_timeouts_are_refused(vm, load, timeout):
    cpu = load("spin", "long")
    with pytest.raises(pyvt.ArgumentError, match="timeout"):
        cpu.run(timeout=timeout)
    assert isinstance(cpu.run(timeout=0.05), exits.Timeout)  # still usable


def test_blocking_calls_in_a_handler_are_not_interrupted(vm):
    # The main thread's 50 ms tick and a stop() from another thread must not
    # reach a handler: C calls that do not retry on EINTR would fail.
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    vm.memory.write(0x1000, pyvt.assemble(".code64\n.globl _start\n_start: in $0x10, %al\n hlt\n"))
    cpu = vm.vcpu(0, mode="long")
    cpu.regs.rip = 0x1000
    results = []

    def handler(exit):
        stopper = threading.Timer(0.05, cpu.stop)
        stopper.start()
        results.append((libc.usleep(300_000), ctypes.get_errno()))
        stopper.join()
        return 0x33

    vm.on_io(0x10, handler)
    exit = cpu.run(timeout=30)
    assert results == [(0, 0)]
    # The stop() that came during the handler still ends the run, after the
    # `in` completed with the handler's value.
    assert isinstance(exit, exits.Stopped) and cpu.regs.rax & 0xFF == 0x33


def test_run_waits_for_a_snapshot_in_another_thread(vm):
    vm.memory.write(0x2000, b"\xf4")
    cpu = vm.vcpu(0, mode="long")
    cpu.regs.rip = 0x2000
    inside, proceed = threading.Event(), threading.Event()
    sync_devices = vm._sync_devices

    def held_sync_devices():  # runs inside the snapshot, with the vCPUs held
        inside.set()
        proceed.wait(10)
        sync_devices()

    vm._sync_devices = held_sync_devices
    taken = []
    snapshotter = threading.Thread(target=lambda: taken.append(vm.snapshot()))
    snapshotter.start()
    assert inside.wait(10)
    releaser = threading.Timer(0.2, proceed.set)
    releaser.start()
    assert cpu.run(timeout=10) == exits.Hlt(0x2001)
    assert proceed.is_set()  # it waited for the snapshot to be let go
    snapshotter.join()
    releaser.join()
    regs = pyvt.kvm.ffi.from_buffer("struct kvm_regs *", taken[0].vcpus[0].regs)
    assert regs.rip == 0x2000  # taken before the run, not during it
    taken[0].close()


def test_a_forked_child_runs_vcpus_with_timeouts(load, vm):
    # The parent's run armed its thread's kick timer; POSIX timers do not
    # survive fork(), so the child must make its own (it got EINVAL before).
    cpu = load("spin", "long")
    assert isinstance(cpu.run(timeout=0.05), exits.Timeout)
    pid = os.fork()
    if pid == 0:  # the child: report through the exit status only
        status = 1
        try:
            with pyvt.Vm("16M") as child_vm:
                child_vm.memory.write(0x1000, vm.memory.read(0x1000, 64))
                child = child_vm.vcpu(0, mode="long")
                child.regs.rip = cpu.regs.rip
                status = 0 if isinstance(child.run(timeout=0.05), exits.Timeout) else 2
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert isinstance(cpu.run(timeout=0.05), exits.Timeout)  # the parent's timer still works
