"""Run control: vm.pause()/resume()/end_run() on a running vm.run(), the
VM's status and its events (pyvt.run_control)."""

from __future__ import annotations

import threading
import time

import pytest

import pyvt
from pyvt import exits
from pyvt.run_control import exit_summary

pytestmark = pytest.mark.requires_kvm

CODE = 0x1000
COUNTERS = 0x5000  # one qword per vCPU
PYTHON_PORT = 0x710  # claimed by no pyvt device (0x510: fw_cfg, 0x600: ACPI PM1)


def counting_guest(vm, cpus: int = 1):
    """Each vCPU i adds 1 to the qword at COUNTERS + 8 * i forever."""
    code = pyvt.assemble("""
        .code64
    _start:
        incq 0x5000(,%rdi,8)
        jmp _start
    """, at=CODE)
    vm.memory.write(CODE, code)
    for index in range(cpus):
        cpu = vm.vcpu(index, mode="long")
        cpu.regs.rip = CODE
        cpu.regs.rdi = index


def read_u64(vm, address):
    return int.from_bytes(vm.memory.read(address, 8), "little")


def counters(vm, cpus: int = 1):
    return [read_u64(vm, COUNTERS + 8 * i) for i in range(cpus)]


def printing_guest(vm):
    """Counts lines in the qword at COUNTERS and prints each one ("x\\n")
    to the native UART, then tells a Python handler the count's low byte."""
    code = pyvt.assemble(f"""
        .code64
    _start:
        incq {COUNTERS}
        mov $0x3f8, %dx
        mov $'x', %al
        out %al, %dx
        mov $'\\n', %al
        out %al, %dx
        mov {COUNTERS}, %rax
        mov ${PYTHON_PORT}, %dx
        out %al, %dx
        jmp _start
    """, at=CODE)
    vm.memory.write(CODE, code)
    cpu = vm.vcpu(0, mode="long")
    cpu.regs.rip = CODE
    return cpu


class Runner:
    """vm.run() in a thread, its outcome kept."""

    def __init__(self, vm, **kwargs):
        self.result = None
        self.error = None
        self.thread = threading.Thread(target=self._run, args=(vm, kwargs), daemon=True)
        self.thread.start()

    def _run(self, vm, kwargs):
        try:
            self.result = vm.run(**kwargs)
        except BaseException as e:  # reported by join()
            self.error = e

    def join(self, timeout=60):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "vm.run() did not return"
        if self.error is not None:
            raise self.error
        return self.result


def wait_for(predicate, limit=30.0):
    deadline = time.monotonic() + limit
    while not predicate():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.01)


def test_pause_holds_the_guest_and_resume_goes_on(vm):
    counting_guest(vm)
    events = []
    vm.subscribe(lambda name, data: events.append((name, data)))
    assert vm.status == "created"
    runner = Runner(vm)
    wait_for(lambda: counters(vm)[0] > 0)
    assert vm.status == "running"
    vm.pause()
    assert vm.status == "paused"
    frozen = counters(vm)
    time.sleep(0.2)
    assert counters(vm) == frozen  # not one more increment while paused
    vm.pause()  # idempotent: no second STOP
    vm.resume()
    assert vm.status == "running"
    wait_for(lambda: counters(vm)[0] > frozen[0])
    vm.end_run(exits.DebugExit(5))
    assert runner.join() == exits.DebugExit(5)
    assert vm.status == "shutdown"
    assert [name for name, _ in events] == ["STOP", "RESUME", "SHUTDOWN"]
    assert events[2][1] == {"exit": "DebugExit", "description": repr(exits.DebugExit(5)),
                            "code": 5, "status": 11}


def test_two_vcpus_both_park_and_a_snapshot_can_be_taken(vm, tmp_path):
    counting_guest(vm, cpus=2)
    runner = Runner(vm)
    wait_for(lambda: min(counters(vm, 2)) > 0)
    vm.pause()
    frozen = counters(vm, 2)
    time.sleep(0.1)
    assert counters(vm, 2) == frozen
    # The vCPUs are parked outside KVM_RUN: their state can be read.
    snap = vm.snapshot()
    states = [cpu.save_state() for cpu in vm.vcpus.values()]
    assert [cpu.regs.rdi for cpu in vm.vcpus.values()] == [0, 1]
    assert all(s.regs for s in states)
    snap.save(tmp_path / "paused.snap")
    vm.resume()
    wait_for(lambda: all(a > b for a, b in zip(counters(vm, 2), frozen, strict=True)))
    vm.end_run(exits.Stopped(None))
    assert isinstance(runner.join(), exits.Stopped)
    # The snapshot holds the paused counts: a restore brings them back.
    vm.restore(pyvt.Snapshot.load(tmp_path / "paused.snap"))
    assert counters(vm, 2) == frozen


def test_printing_guest_loses_nothing_and_repeats_nothing(vm):
    seen = []
    vm.on_io(PYTHON_PORT, lambda exit: seen.append(exit.value & 0xFF))
    printing_guest(vm)
    runner = Runner(vm)
    for _ in range(3):
        wait_for(lambda: len(seen) > 2)
        vm.pause()
        count = read_u64(vm, COUNTERS)
        lines = vm.console.output.count(b"x\n")
        # The guest is between two instructions of its loop: its last line is
        # printed, or about to be after the count's increment.
        assert count - 1 <= lines <= count
        reported = len(seen)
        time.sleep(0.1)
        assert len(seen) == reported and read_u64(vm, COUNTERS) == count
        vm.resume()
        wait_for(lambda reported=reported: len(seen) > reported + 2)
    vm.end_run(exits.Stopped(None))
    runner.join()
    # Each count reached the handler once, in order: no write lost or made twice.
    expected = [(n + 1) & 0xFF for n in range(len(seen))]
    assert seen == expected
    assert vm.console.output == b"x\n" * vm.console.output.count(b"x\n")


def test_pause_does_not_use_up_the_run_timeout(vm):
    counting_guest(vm)
    runner = Runner(vm, timeout=0.5)
    wait_for(lambda: counters(vm)[0] > 0)
    vm.pause()
    time.sleep(1.0)  # twice the run's whole budget
    assert runner.thread.is_alive()
    vm.resume()
    exit = runner.join()
    assert exit == exits.Timeout(0.5, exit.rip)
    assert vm.status == "shutdown"


def test_pause_without_a_run_starts_the_next_run_parked(vm):
    counting_guest(vm)
    events = []
    vm.subscribe(lambda name, data: events.append(name))
    vm.pause()
    assert vm.status == "paused"
    runner = Runner(vm)
    time.sleep(0.3)
    assert counters(vm) == [0] and vm.status == "paused"
    vm.resume()
    wait_for(lambda: counters(vm)[0] > 0)
    vm.pause()
    vm.end_run(exits.Stopped(None))  # a paused run ends too
    runner.join()
    assert events == ["STOP", "RESUME", "STOP", "SHUTDOWN"]
    # Paused again with no run: resume goes back to "shutdown", not "running".
    vm.pause()
    vm.resume()
    assert vm.status == "shutdown"


def test_end_run_before_a_run_makes_it_return_at_once(vm):
    counting_guest(vm)
    vm.end_run(exits.DebugExit(1))
    assert vm.run(timeout=30) == exits.DebugExit(1)
    assert counters(vm) == [0]  # the guest never ran
    # Once returned, the exit is spent: the next run runs.
    assert isinstance(vm.run(timeout=0.1), exits.Timeout)
    assert counters(vm)[0] > 0


def test_one_vcpus_exit_still_ends_an_smp_run(vm):
    """Run control leaves the multi-vCPU rule alone: one vCPU halts, the
    other (spinning) is stopped, the run returns the halt."""
    counting_guest(vm, cpus=1)
    vm.memory.write(0x3000, b"\xf4")  # hlt
    cpu = vm.vcpu(1, mode="long")
    cpu.regs.rip = 0x3000
    assert isinstance(vm.run(timeout=30), exits.Hlt)
    assert vm.status == "shutdown"


def test_a_failing_subscriber_is_reported_once_and_the_vm_goes_on(vm, capfd):
    counting_guest(vm)
    good = []

    def bad(name, data):
        raise RuntimeError("subscriber bug")

    vm.subscribe(bad)
    unsubscribe = vm.subscribe(lambda name, data: good.append(name))
    runner = Runner(vm)
    wait_for(lambda: counters(vm)[0] > 0)
    vm.pause()
    vm.resume()
    unsubscribe()
    vm.pause()
    vm.end_run(exits.Stopped(None))
    runner.join()
    assert good == ["STOP", "RESUME"]
    err = capfd.readouterr().err
    assert err.count("subscriber bug") == 1 and "RuntimeError" in err


def test_pause_from_a_vcpu_thread_is_refused(vm):
    errors = []

    def handler(exit):
        try:
            vm.pause(timeout=1)
        except pyvt.RunControlError as e:
            errors.append(str(e))
        vm.end_run(exits.Stopped(None))

    vm.on_io(PYTHON_PORT, handler)
    vm.memory.write(CODE, pyvt.assemble(f"""
        .code64
    _start:
        mov ${PYTHON_PORT}, %dx
        out %al, %dx
        jmp _start
    """, at=CODE))
    vm.vcpu(0, mode="long").regs.rip = CODE
    runner = Runner(vm)
    runner.join()
    assert errors and "vCPU threads" in errors[0]


def test_bad_arguments(vm):
    with pytest.raises(pyvt.ArgumentError):
        vm.end_run("quit")
    with pytest.raises(pyvt.ArgumentError):
        vm.pause(timeout=-1)
    with pytest.raises(pyvt.ArgumentError):
        vm.subscribe(42)
    with pytest.raises(pyvt.ArgumentError):
        vm._set_status("")
    vm._set_status("inmigrate")
    assert vm.status == "inmigrate"


def test_exit_summary():
    assert exit_summary(exits.Hlt(0x10)) == {"exit": "Hlt", "description": "Hlt(rip=0x10)"}


def test_pause_times_out_on_a_handler_that_does_not_return(vm):
    release = threading.Event()
    calls = []

    def handler(exit):
        calls.append(exit.value)
        release.wait(60)

    vm.on_io(PYTHON_PORT, handler)
    vm.memory.write(CODE, pyvt.assemble(f"""
        .code64
    _start:
        incq {COUNTERS}
        mov ${PYTHON_PORT}, %dx
        out %al, %dx
        jmp _start
    """, at=CODE))
    vm.vcpu(0, mode="long").regs.rip = CODE
    events = []
    vm.subscribe(lambda name, data: events.append(name))
    runner = Runner(vm)
    wait_for(lambda: calls)
    with pytest.raises(pyvt.RunControlError, match="did not stop within 0.2 s"):
        vm.pause(timeout=0.2)
    assert vm.status == "running" and events == []  # undone: the VM runs on
    release.set()
    wait_for(lambda: len(calls) > 3)
    vm.pause()
    count = read_u64(vm, COUNTERS)
    assert len(calls) in (count - 1, count)
    vm.end_run(exits.Stopped(None))
    runner.join()
    assert events == ["STOP", "SHUTDOWN"]
