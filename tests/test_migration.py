"""Live migration of running guests (issue 17): a guest that keeps writing
memory and printing numbered lines moves mid-run; its memory checks out,
and the source's and destination's consoles together hold every line once.
Failures on the way leave the source running to its normal end."""

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import pyvt
from pyvt import exits
from pyvt.migration import Listener

sys.path.insert(0, str(Path(__file__).parent))
from migration_guest import Counter, Proxy, lines_of, make_vm, wait_for_lines  # noqa: E402

pytestmark = pytest.mark.requires_kvm

#: Where the installed pyvt lives: the subprocesses run there, so that
#: `python -m pyvt` imports it and not an unbuilt checkout in the cwd.
PACKAGE_PARENT = os.path.dirname(os.path.dirname(pyvt.__file__))

LINES = 3000


def expected(prefix="A", n=LINES):
    return [f"{prefix}{i:05x}" for i in range(n)]


class Background:
    """``work()`` in a thread: its return value is ``exit``, what it raised
    ``error``."""

    def __init__(self, work):
        self.exit = self.error = None
        self.thread = threading.Thread(target=self._run, args=(work,), daemon=True)
        self.thread.start()

    def _run(self, work):
        try:
            self.exit = work()
        except BaseException as e:
            self.error = e

    def join(self):
        self.thread.join(180)
        assert not self.thread.is_alive()


class Destination(Background):
    """Vm.incoming in a thread, running what arrives to its end."""

    def __init__(self, setup=None, uri="tcp:127.0.0.1:0"):
        self.listener = Listener(uri)
        self.uri = self.listener.uri
        self.vm = None
        self.setup = setup
        super().__init__(self._receive_and_run)

    def _receive_and_run(self):
        self.vm = pyvt.Vm.incoming(self.listener, setup=self.setup, timeout=60)
        return self.vm.run(timeout=120)


class Source(Background):
    """The source VM's vm.run() in a thread (which must not raise)."""

    def __init__(self, vm):
        self.vm = vm
        super().__init__(lambda: vm.run(timeout=120))

    def join(self):
        super().join()
        assert self.error is None, self.error


def migrate_mid_run(vm, uri, **kw):
    source = Source(vm)
    wait_for_lines(vm, 20)
    result = vm.migrate(uri, **kw)
    source.join()
    return source, result


def check_moved(source, result, dest, source_vm, prefix="A", lines=LINES):
    """The source's and destination's UART output together are every line
    once (the destination's console holds the whole history: the source's
    output moved with the UART's state; each side printed its own part)."""
    assert result.status == "completed", result
    assert result.rounds >= 2 and result.transferred_bytes > 0
    assert result.downtime_ms is not None and result.downtime_ms <= result.total_ms
    assert isinstance(source.exit, exits.Migrated) and source.exit.destination == result.uri
    dest.join()
    assert dest.error is None, dest.error
    # Code 0: the guest's memory sum and (if any) its device count match.
    assert isinstance(dest.exit, exits.DebugExit) and dest.exit.code == 0, dest.exit
    before = source_vm.console.output
    history = dest.vm.console.output
    assert history.startswith(before)
    after = history[len(before):]
    assert lines_of(before) and lines_of(after), "the migration was not mid-run"
    assert lines_of(before, after) == expected(prefix, lines)


@pytest.fixture
def moving(tmp_path):
    """``moving(vm_options..., setup=...)`` -> (source VM, Destination), both
    closed after the test."""
    made = []

    def make(setup=None, **options):
        vm = make_vm(out_dir=tmp_path, **options)
        dest = Destination(setup=setup)
        made.append((vm, dest))
        return vm, dest

    yield make
    for vm, dest in made:
        vm.close()
        dest.thread.join(180)
        if dest.vm is not None:
            dest.vm.close()


@pytest.mark.parametrize("ring", [False, True], ids=["dirty-bitmap", "dirty-ring"])
def test_a_running_guest_moves_with_its_memory_and_every_line_once(moving, ring):
    vm, dest = moving(lines=LINES, dirty_ring=ring)
    source, result = migrate_mid_run(vm, dest.uri)
    check_moved(source, result, dest, vm)
    assert vm.status == "migrated" and vm.migration.info()["status"] == "completed"
    assert vm.run() == source.exit  # a migrated VM does not run again here


def test_an_smp_guest_moves_with_both_vcpus(moving):
    vm, dest = moving(lines=LINES, smp=True)
    source, result = migrate_mid_run(vm, dest.uri)
    check_moved(source, result, dest, vm)  # vCPU 0's lines, on the UART
    assert sorted(dest.vm.vcpus) == [0, 1]
    before, after = vm.debugcon.output, dest.vm.debugcon.output  # vCPU 1's
    assert after.startswith(before) and len(after) > len(before) > 0
    assert lines_of(after) == expected("B")


def test_a_python_handled_device_state_follows_through_its_hook(moving):
    moved = Counter()
    vm, dest = moving(lines=LINES, device=True, setup=moved.attach)
    counter = Counter()
    counter.attach(vm)
    source, result = migrate_mid_run(vm, dest.uri)
    check_moved(source, result, dest, vm)
    # The count moved with the VM: the guest read back one count of all its lines.
    assert 0 < counter.count < LINES and moved.count == LINES


def test_a_destination_without_the_handlers_refuses_and_the_source_runs_on(moving):
    vm, dest = moving(lines=LINES, device=True)
    counter = Counter()
    counter.attach(vm)
    source = Source(vm)
    wait_for_lines(vm, 20)
    result = vm.migrate(dest.uri)
    assert result.status == "failed"
    assert "0x560" in result.error and "setup" in result.error
    source.join()
    dest.join()
    assert isinstance(dest.error, pyvt.MigrationError)
    assert isinstance(source.exit, exits.DebugExit) and source.exit.code == 0
    assert lines_of(vm.console.output) == expected() and counter.count == LINES


def _runs_on_after(tmp_path, action, after, dest_kind="thread"):
    """Migrates through a Proxy that does ``action`` after ``after`` bytes;
    the source must end normally with every line."""
    vm = make_vm(LINES, out_dir=tmp_path)
    proc = None
    if dest_kind == "thread":
        dest = Destination()
        target = dest.listener.sock.getsockname()[:2]
        on_trigger = None
    else:  # a `pyvt incoming` process, killed mid-stream
        dest = None
        port_file = tmp_path / "port"
        import socket

        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        proc = subprocess.Popen([sys.executable, "-m", "pyvt", "incoming",
                                 f"tcp:127.0.0.1:{port}", "--no-stdin"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env={**os.environ, "PYTHONPATH": PACKAGE_PARENT}, bufsize=0, cwd=PACKAGE_PARENT)
        assert b"waiting for a VM" in proc.stderr.readline()
        target = ("127.0.0.1", port)
        on_trigger = lambda: proc.send_signal(signal.SIGKILL)  # noqa: E731
        del port_file
    proxy = Proxy(target, after, action, on_trigger)
    try:
        source = Source(vm)
        wait_for_lines(vm, 20)
        migration = vm.start_migration(proxy.uri)
        if action == "stall":
            assert proxy.triggered.wait(30)
            assert migration.info()["status"] == "active"
            migration.cancel()
        result = migration.wait(120)
        assert proxy.triggered.is_set()
        source.join()
        assert isinstance(source.exit, exits.DebugExit) and source.exit.code == 0, source.exit
        assert lines_of(vm.console.output) == expected()
        assert vm.status == "shutdown"
        if dest is not None:
            dest.join()
            assert isinstance(dest.error, pyvt.MigrationError) and dest.vm is None
        if proc is not None:
            proc.wait(30)
            assert proc.returncode == -signal.SIGKILL
        return result
    finally:
        vm.close()
        if proc is not None and proc.poll() is None:
            proc.kill()


def test_a_dropped_connection_leaves_the_source_running(tmp_path):
    result = _runs_on_after(tmp_path, "drop", 2 << 20)
    assert result.status == "failed" and "connection" in result.error


def test_a_corrupted_chunk_is_refused_and_the_source_runs_on(tmp_path):
    result = _runs_on_after(tmp_path, "corrupt", 3 << 20)
    assert result.status == "failed" and "checksum" in result.error, result.error


def test_a_killed_destination_leaves_the_source_running(tmp_path):
    result = _runs_on_after(tmp_path, "call", 2 << 20, dest_kind="process")
    assert result.status == "failed"


def test_a_cancelled_migration_leaves_the_source_running(tmp_path):
    result = _runs_on_after(tmp_path, "stall", 2 << 20)
    assert result.status == "cancelled" and result.error


def test_pyvt_incoming_runs_the_vm_to_its_end_with_the_rest_of_its_console(tmp_path):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    proc = subprocess.Popen([sys.executable, "-m", "pyvt", "incoming", f"tcp:127.0.0.1:{port}",
                             "--no-stdin"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": PACKAGE_PARENT}, bufsize=0, cwd=PACKAGE_PARENT)
    vm = make_vm(LINES, out_dir=tmp_path)
    try:
        assert b"waiting for a VM on tcp:127.0.0.1:" in proc.stderr.readline()
        source, result = migrate_mid_run(vm, f"tcp:127.0.0.1:{port}")
        out, err = proc.communicate(timeout=120)
        assert result.status == "completed", result
        assert proc.returncode == 1, err  # the guest's debug-exit: (0 << 1) | 1
        assert b"DebugExit(code=0x0" in err
        assert lines_of(vm.console.output, out) == expected()
        assert lines_of(vm.console.output) and lines_of(out)
    finally:
        vm.close()
        if proc.poll() is None:
            proc.kill()


# -- between two network namespaces ----------------------------------------------


def _ip(*args):
    return subprocess.run(["ip", *args], capture_output=True, text=True)


@pytest.fixture
def namespaces():
    tag = f"pyvt{os.getpid() % 100000}"
    a, b = f"{tag}a", f"{tag}b"
    made = _ip("netns", "add", a)
    if made.returncode:
        pytest.skip(f"cannot create a network namespace here: {made.stderr.strip()}")
    try:
        for step in (("netns", "add", b),
                     ("link", "add", f"{tag}x", "netns", a, "type", "veth", "peer", "name",
                      f"{tag}y", "netns", b),
                     ("-n", a, "addr", "add", "10.217.0.1/24", "dev", f"{tag}x"),
                     ("-n", b, "addr", "add", "10.217.0.2/24", "dev", f"{tag}y"),
                     ("-n", a, "link", "set", f"{tag}x", "up"),
                     ("-n", b, "link", "set", f"{tag}y", "up"),
                     ("-n", a, "link", "set", "lo", "up"),
                     ("-n", b, "link", "set", "lo", "up")):
            done = _ip(*step)
            if done.returncode:
                pytest.skip(f"cannot set up a veth pair between namespaces: ip {' '.join(step)}: "
                            f"{done.stderr.strip()}")
        yield a, b
    finally:
        _ip("netns", "del", a)
        _ip("netns", "del", b)


def test_a_guest_moves_between_two_network_namespaces_over_a_veth_pair(namespaces, tmp_path):
    a, b = namespaces
    env = {**os.environ, "PYTHONPATH": PACKAGE_PARENT, "TMPDIR": str(tmp_path)}
    dest = subprocess.Popen(["ip", "netns", "exec", b, sys.executable, "-m", "pyvt", "incoming",
                             "tcp:10.217.0.2:4444", "--no-stdin"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, bufsize=0, cwd=PACKAGE_PARENT)
    try:
        assert b"waiting for a VM on tcp:10.217.0.2:4444" in dest.stderr.readline()
        source = subprocess.run(["ip", "netns", "exec", a, sys.executable,
                                 str(Path(__file__).parent / "migration_guest.py"),
                                 "tcp:10.217.0.2:4444"],
                                capture_output=True, env=env, timeout=180, cwd=PACKAGE_PARENT)
        out, err = dest.communicate(timeout=120)
        report = json.loads(source.stderr.decode().strip().splitlines()[-1])
        assert report["migration"]["status"] == "completed", report
        assert report["exit"].startswith("Migrated(to tcp:10.217.0.2:4444")
        assert dest.returncode == 1, err
        assert lines_of(source.stdout) and lines_of(out)
        assert lines_of(source.stdout, out) == expected()
    finally:
        if dest.poll() is None:
            dest.kill()


def test_a_guest_dirtying_faster_than_the_target_allows_is_throttled_and_moves(moving):
    # A downtime target no dirtying guest can meet: pre-copy alone never
    # converges, so auto-converge throttles the vCPUs until it moves anyway.
    # The guest writes memory nearly all the time (a line every 100,000
    # writes), so that no round finds nothing written.
    vm, dest = moving(lines=LINES, spin=1, per_line=100_000)
    source, result = migrate_mid_run(vm, dest.uri, downtime_ms=0.001)
    check_moved(source, result, dest, vm)
    # Whether a round found nothing written (the vCPU thread not scheduled
    # meanwhile, on a busy host) or the throttle rose, the result says which.
    assert result.throttle_percent > 0 or result.remaining_bytes == 0


def test_the_throttle_parks_the_running_vcpus_a_share_of_the_time(tmp_path):
    import types

    from pyvt.migration import source as migration_source

    vm = make_vm(LINES, out_dir=tmp_path)
    events = []
    vm.subscribe(lambda name, data: events.append(name))
    runner = Source(vm)
    wait_for_lines(vm, 5)
    throttle = types.SimpleNamespace(vm=vm, throttle_percent=50,
                                     _throttle_stop=threading.Event())
    worker = threading.Thread(target=migration_source.Migration._throttle, args=(throttle,))
    worker.start()
    wait_for_lines(vm, 60)  # the guest goes on, throttled
    throttle._throttle_stop.set()
    worker.join(30)
    assert events.count("STOP") >= 1 and events.count("STOP") == events.count("RESUME")
    runner.join()
    assert isinstance(runner.exit, exits.DebugExit) and runner.exit.code == 0
    assert lines_of(vm.console.output) == expected()
    vm.close()


def test_auto_converge_raises_the_throttle_when_pre_copy_does_not_converge():
    from pyvt.migration.source import MAX_THROTTLE, next_throttle

    mib = 1 << 20
    assert next_throttle(0, 1, 900 * mib, 100 * mib, 50 * mib, 1 << 62) == 0  # too early
    assert next_throttle(0, 2, 10 * mib, 100 * mib, 5 * mib, 8 * mib) == 0  # converging
    assert next_throttle(0, 2, 90 * mib, 100 * mib, 5 * mib, 8 * mib) == 20  # dirtying fast
    assert next_throttle(20, 3, 10 * mib, 100 * mib, 8 * mib, 8 * mib) == 30  # not shrinking
    assert next_throttle(95, 9, 90 * mib, 100 * mib, 5 * mib, 8 * mib) == MAX_THROTTLE


def test_pyvt_run_with_a_control_socket_migrates_to_pyvt_incoming(tmp_path):
    """The CLI end to end: `pyvt run --control`, `pyvt ctl PATH migrate`,
    `pyvt incoming`; the source exits 0 saying where the VM went."""
    # bufsize=0 on the Popens of this file: a buffered readline() may take
    # more than its line from the pipe, and communicate() never sees it.
    import socket

    # The guest's registers, set by a prelude (pyvt run cannot set them).
    guest = (Path(__file__).parent / "guests" / "migrate_dirty.S").read_text()
    prelude = (f"    .code64\n    mov ${LINES}, %rbp\n    mov $64, %r8\n    mov $3000000, %r9\n"
               "    mov $0x200000, %rdi\n    mov $1023, %rsi\n    mov $0x41, %r10\n"
               "    mov $0x3f8, %r11\n    xor %r13, %r13\n    xor %r14, %r14\n")
    source_file = tmp_path / "guest.S"
    source_file.write_text(prelude + guest)
    control = tmp_path / "vm.sock"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": PACKAGE_PARENT}
    dest = subprocess.Popen([sys.executable, "-m", "pyvt", "incoming", f"tcp:127.0.0.1:{port}",
                             "--no-stdin"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env, bufsize=0, cwd=PACKAGE_PARENT)
    source = subprocess.Popen([sys.executable, "-m", "pyvt", "run", str(source_file), "--ring",
                               "3", "--control", str(control)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=env, bufsize=0, cwd=PACKAGE_PARENT)
    try:
        assert b"waiting for a VM" in dest.stderr.readline()
        first = source.stdout.readline()  # the guest runs: the socket is there
        assert first == b"A00000\n"
        ctl = subprocess.run([sys.executable, "-m", "pyvt", "ctl", str(control), "migrate",
                              f"tcp:127.0.0.1:{port}"], capture_output=True, env=env,
                             timeout=120, cwd=PACKAGE_PARENT)
        report = json.loads(ctl.stdout)
        assert ctl.returncode == 0 and report["status"] == "completed", (ctl.stdout, ctl.stderr)
        assert report["downtime_ms"] is not None and report["rounds"] >= 2
        out, err = source.communicate(timeout=60)
        assert source.returncode == 0, err
        assert f"Migrated(to tcp:127.0.0.1:{port}".encode() in err
        dest_out, dest_err = dest.communicate(timeout=120)
        assert dest.returncode == 1, dest_err  # the guest's debug-exit code 0: status 1
        assert lines_of(first + out, dest_out) == expected()
    finally:
        for p in (source, dest):
            if p.poll() is None:
                p.kill()
