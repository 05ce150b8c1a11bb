"""``pyvt run --control``, ``pyvt ctl`` and ``pyvt top`` as processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time

import pytest
from test_cli import PACKAGE_PARENT, PYVT, one_line_error

import pyvt
from pyvt import ctl, exits

pytestmark = pytest.mark.requires_kvm

#: Counts at 0x5000 and prints a dot on the UART, forever.
SPIN_PRINT = """
    .code64
    .globl _start
_start:
    incq 0x5000
    mov $0x3f8, %dx
    mov $'.', %al
    out %al, %dx
    jmp _start
"""


@pytest.fixture
def env(tmp_path):
    environment = dict(os.environ, XDG_RUNTIME_DIR=str(tmp_path / "xdg"))
    environment["PYTHONPATH"] = PACKAGE_PARENT + os.pathsep + environment.get("PYTHONPATH", "")
    return environment


def pyvt_cli(env, *args, timeout=120, cwd=PACKAGE_PARENT):
    return subprocess.run([*PYVT, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=env)


class Guest:
    """``pyvt run SPIN_PRINT --control PATH --name NAME`` in the background."""

    def __init__(self, env, tmp_path, name):
        source = tmp_path / f"{name}.S"
        source.write_text(SPIN_PRINT)
        self.socket = tmp_path / f"{name}.sock"
        self.process = subprocess.Popen(
            [*PYVT, "run", str(source), "--control", str(self.socket), "--name", name],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=PACKAGE_PARENT,
            env=env)
        deadline = time.monotonic() + 60
        while not self.socket.exists():
            assert self.process.poll() is None, self.process.stderr.read()
            assert time.monotonic() < deadline, "pyvt run never served its socket"
            time.sleep(0.05)

    def stop(self):
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(30)
        self.process.stderr.close()


@pytest.fixture
def guests(env, tmp_path):
    started = []

    def start(name):
        guest = Guest(env, tmp_path, name)
        started.append(guest)
        return guest

    yield start
    for guest in started:
        guest.stop()


def test_ctl_commands_and_exit_statuses(env, guests, tmp_path):
    guest = guests("alpha")
    out = pyvt_cli(env, "ctl", guest.socket, "query-status")
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)["return"]
    assert (status["name"], status["status"], status["pid"]) == (
        "alpha", "running", guest.process.pid)
    assert json.loads(pyvt_cli(env, "ctl", guest.socket, "stop").stdout) == {"return": {}}
    assert json.loads(pyvt_cli(env, "ctl", guest.socket, "query-status").stdout)[
        "return"]["status"] == "paused"
    snap = tmp_path / "alpha.snap"
    out = pyvt_cli(env, "ctl", guest.socket, "snapshot", snap)
    assert out.returncode == 0 and json.loads(out.stdout)["return"]["path"] == str(snap)
    pyvt.Snapshot.load(snap).close()
    assert pyvt_cli(env, "ctl", guest.socket, "cont").returncode == 0
    # An error reply: printed, status 1.
    out = pyvt_cli(env, "ctl", guest.socket, "frobnicate")
    assert out.returncode == 1
    assert json.loads(out.stdout)["error"]["class"] == "CommandNotFound"
    out = pyvt_cli(env, "ctl", guest.socket, "snapshot", "path=5")
    assert out.returncode == 1 and json.loads(out.stdout)["error"]["class"] == "InvalidArgument"
    # Usage errors: status 2, one pyvt: line.
    assert "no control socket" in one_line_error(
        pyvt_cli(env, "ctl", tmp_path / "none.sock", "query-status"))
    assert "not a socket" in one_line_error(pyvt_cli(env, "ctl", snap, "query-status"))
    assert "cannot parse" in one_line_error(pyvt_cli(env, "ctl", guest.socket, "stop", "now"))
    assert "given twice" in one_line_error(
        pyvt_cli(env, "ctl", guest.socket, "stop", "a=1", "a=2"))
    one_line_error(pyvt_cli(env, "ctl", guest.socket))
    assert "--control" in one_line_error(pyvt_cli(env, "run", "x.S", "--name", "lonely"))
    # quit: pyvt run exits 0, saying so; the socket and registration go.
    out = pyvt_cli(env, "ctl", guest.socket, "quit")
    assert out.returncode == 0 and json.loads(out.stdout) == {"return": {}}
    assert guest.process.wait(60) == 0
    assert "Quit(by control socket)" in guest.process.stderr.read()
    assert not guest.socket.exists()
    assert "cannot connect" in one_line_error(pyvt_cli(env, "ctl", guest.socket, "stop")) or \
        "no control socket" in one_line_error(pyvt_cli(env, "ctl", guest.socket, "stop"))


def test_ctl_parses_values_as_json_when_they_parse():
    assert ctl.parse_arguments("migrate", ["tcp:h:1", "downtime_ms=50"]) == {
        "uri": "tcp:h:1", "downtime_ms": 50}
    assert ctl.parse_arguments("x", ["a=true", "b=[1]", "c=word", "d=", 'e="5"']) == {
        "a": True, "b": [1], "c": "word", "d": "", "e": "5"}
    assert ctl.parse_arguments("snapshot", ["/tmp/a=b.snap"]) == {"path": "/tmp/a=b.snap"}
    with pytest.raises(ctl.UsageError):
        ctl.parse_arguments("stop", ["positional"])
    with pytest.raises(ctl.UsageError):
        ctl.parse_arguments("migrate", ["downtime_ms=1", "tcp:h:1"])


def test_top_json_shows_two_running_vms_with_growing_counters(env, guests):
    alpha, beta = guests("alpha"), guests("beta")
    samples = []
    for _ in range(2):
        out = pyvt_cli(env, "top", "--json", "--interval", "0.3")
        assert out.returncode == 0, out.stderr
        samples.append({row["name"]: row for row in json.loads(out.stdout)})
    for name, guest in (("alpha", alpha), ("beta", beta)):
        first, second = samples[0][name], samples[1][name]
        assert first["pid"] == guest.process.pid and first["state"] == "running"
        assert first["vcpus"] == 1 and first["memory"] == 16 << 20
        assert second["stats"]["kvm_exits"] > first["stats"]["kvm_exits"]
        assert second["stats"]["guest_time_ns"] > first["stats"]["guest_time_ns"]
        assert second["stats"]["exits_by_reason"]["io"] > first["stats"]["exits_by_reason"]["io"]
        assert first["exits_per_s"] > 0 and first["exits_per_s_by_reason"]["io"] > 0
        assert first["native_exits_per_s"] > 0 and first["python_exits_per_s"] == 0  # the UART
        assert 0 < first["guest_percent"] <= 100
        assert first["dirty_pages_per_s"] == 0  # nothing logs the writes
    # A VM that ended is gone from the list.
    alpha.stop()
    out = pyvt_cli(env, "top", "--json", "--interval", "0.1")
    assert [row["name"] for row in json.loads(out.stdout)] == ["beta"]


def test_top_live_view_draws_the_table(env, guests):
    pytest.importorskip("rich")
    guests("gamma")
    process = subprocess.Popen([*PYVT, "top", "--interval", "0.2"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=PACKAGE_PARENT, env=env)
    time.sleep(3)
    process.send_signal(2)  # Ctrl-C: how one leaves it
    out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    assert "gamma" in out and "% guest" in out and "io" in out


def test_top_without_rich_says_how_to_install_it(env, tmp_path):
    blocker = tmp_path / "norich"
    blocker.mkdir()
    (blocker / "rich.py").write_text("raise ImportError('no rich here')\n")
    env = dict(env, PYTHONPATH=str(blocker) + os.pathsep + env["PYTHONPATH"])
    # `python -m` puts the cwd first on sys.path: run in the blocker's
    # directory, or the installed package's directory (where a real rich
    # may sit beside pyvt) would win.
    line = one_line_error(pyvt_cli(env, "top", cwd=blocker))
    assert "pip install 'pyvt[top]'" in line and "--json" in line
    out = pyvt_cli(env, "top", "--json", "--interval", "0.05", cwd=blocker)
    assert out.returncode == 0 and json.loads(out.stdout) == []


class FakeMigration:
    """Stands in for pyvt.migration.Migration: completes (or is cancelled)
    after a few polls, as the source side reports it."""

    def __init__(self, vm, uri, downtime_ms, outcome):
        self.vm, self.uri, self.outcome = vm, uri, outcome
        self.status, self.done, self.polls = "active", False, 0

    def info(self):
        self.polls += 1
        if self.polls == 3 and not self.done:
            threading.Thread(target=self.finish).start()
        return {"status": self.status, "uri": self.uri, "downtime_ms": 12.5 if
                self.status == "completed" else None, "total_ms": 40.0,
                "transferred_bytes": 1 << 20, "rounds": 3}

    def finish(self):
        self.status, self.done = self.outcome, True
        if self.outcome == "completed":  # the source's run ends (exits.Migrated, really)
            self.vm.end_run(exits.Quit("migration"))
        self.vm._emit_event("MIGRATION", {"status": self.outcome, "uri": self.uri})

    def cancel(self):
        self.finish()

    def wait(self, timeout=None):
        return self


@pytest.mark.parametrize("outcome,status", [("completed", 0), ("failed", 1)])
def test_ctl_migrate_waits_for_the_end(vm, tmp_path, env, monkeypatch, outcome, status):
    def start_migration(vm, uri, downtime_ms=30):
        vm.__dict__["_fake_migration"] = FakeMigration(vm, uri, downtime_ms, outcome)
        return vm.__dict__["_fake_migration"]

    monkeypatch.setattr(pyvt.Vm, "start_migration", start_migration, raising=False)
    monkeypatch.setattr(pyvt.Vm, "migration",
                        property(lambda vm: vm.__dict__.get("_fake_migration")), raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", env["XDG_RUNTIME_DIR"])
    vm.memory.write(0x1000, pyvt.assemble(SPIN_PRINT, at=0x1000))
    vm.vcpu(0, mode="long").regs.rip = 0x1000
    path = tmp_path / "m.sock"
    vm.serve_control(path)
    result = {}
    runner = threading.Thread(target=lambda: result.setdefault("exit", vm.run()), daemon=True)
    runner.start()
    out = pyvt_cli(env, "ctl", path, "migrate", "tcp:127.0.0.1:9", "downtime_ms=20")
    assert out.returncode == status, out.stderr
    report = json.loads(out.stdout)
    assert report["status"] == outcome
    for key in ("downtime_ms", "total_ms", "transferred_bytes", "rounds"):
        assert key in report
    assert report["transferred_bytes"] == 1 << 20 and report["rounds"] == 3
    if outcome == "completed":
        runner.join(30)
        assert not runner.is_alive()
    else:
        vm.end_run(exits.Stopped(None))
        runner.join(30)


def test_boot_smp_with_a_control_socket(env, tmp_path):
    """pyvt boot --smp 2 --control: both vCPUs (the AP still waiting for
    its INIT/SIPI, inside KVM_RUN) pause, go on, and quit ends the boot."""
    from kernelbuild import build_kernel, toolchain_missing

    if toolchain_missing():
        pytest.skip("no toolchain for the test kernels")
    kernel = build_kernel("spin", tmp_path)
    path = tmp_path / "boot.sock"
    process = subprocess.Popen([*PYVT, "boot", str(kernel), "--smp", "2", "--memory", "32M",
                                "--no-stdin", "--control", str(path), "--name", "booted"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               cwd=PACKAGE_PARENT, env=env)
    try:
        deadline = time.monotonic() + 60
        while not path.exists():
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        status = json.loads(pyvt_cli(env, "ctl", path, "query-status").stdout)["return"]
        assert (status["name"], status["vcpus"]) == ("booted", 2)
        assert pyvt_cli(env, "ctl", path, "stop").returncode == 0
        stats = json.loads(pyvt_cli(env, "ctl", path, "query-stats").stdout)["return"]
        assert stats["status"] == "paused" and len(stats["vcpus"]) == 2
        again = json.loads(pyvt_cli(env, "ctl", path, "query-stats").stdout)["return"]
        assert again["vm"]["kvm_exits"] == stats["vm"]["kvm_exits"]  # nothing ran meanwhile
        assert pyvt_cli(env, "ctl", path, "cont").returncode == 0
        assert pyvt_cli(env, "ctl", path, "quit").returncode == 0
        out, err = process.communicate(timeout=60)
        assert process.returncode == 0, err
        assert out == "spinning\n" and "Quit(by control socket)" in err
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def test_ctl_migrate_moves_a_running_pyvt_run(env, guests, tmp_path):
    """The real thing (pyvt.migration): pyvt ctl migrate moves a running
    `pyvt run --control` to a VM waiting in this process; the source exits 0
    saying where the VM went, and the guest runs on at the destination."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()
    uri = f"tcp:127.0.0.1:{port}"
    arrived = {}

    def destination():
        try:
            arrived["vm"] = pyvt.Vm.incoming(uri, timeout=60)
        except Exception as e:  # reported below
            arrived["error"] = e

    waiting = threading.Thread(target=destination, daemon=True)
    waiting.start()
    source = guests("mover")
    deadline = time.monotonic() + 30
    out = pyvt_cli(env, "ctl", source.socket, "migrate", uri, "downtime_ms=100")
    while out.returncode != 0 and "refused" in out.stdout and time.monotonic() < deadline:
        time.sleep(0.2)  # the destination was not listening yet
        out = pyvt_cli(env, "ctl", source.socket, "migrate", uri, "downtime_ms=100")
    assert out.returncode == 0, (out.stdout, out.stderr)
    report = json.loads(out.stdout)
    assert report["status"] == "completed" and report["rounds"] >= 1
    assert report["transferred_bytes"] > 0 and report["total_ms"] >= report["downtime_ms"] > 0
    assert source.process.wait(60) == 0
    assert f"Migrated(to {uri}" in source.process.stderr.read()
    waiting.join(60)
    assert "error" not in arrived, arrived.get("error")
    vm = arrived["vm"]
    try:
        before = int.from_bytes(vm.memory.read(0x5000, 8), "little")
        assert before > 0  # the count the source reached came along
        assert isinstance(vm.run(timeout=0.5), exits.Timeout)
        assert int.from_bytes(vm.memory.read(0x5000, 8), "little") > before
    finally:
        vm.close()


def test_top_lists_a_vm_it_cannot_reach_as_unreachable(tmp_path):
    from pyvt import top

    directory = tmp_path / "run"
    directory.mkdir()
    (directory / f"{os.getpid()}-0.json").write_text(json.dumps(
        {"name": "lost", "pid": os.getpid(), "socket": str(tmp_path / "gone.sock"),
         "vcpus": 2, "memory": 1 << 20}))
    (rows,) = [top.sample(0.01, str(directory))]
    assert len(rows) == 1
    row = rows[0]
    assert (row["name"], row["state"], row["vcpus"], row["exits_per_s"]) == (
        "lost", "unreachable", 2, None)
    assert set(row) >= {"native_exits_per_s", "python_exits_per_s", "guest_percent",
                        "dirty_pages_per_s", "exits_per_s_by_reason"}
