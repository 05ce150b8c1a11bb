"""The control socket (pyvt.control): vm.serve_control(path) on a running
guest, its JSON-lines protocol, bad requests, concurrent clients, events,
the runtime-directory registration."""

from __future__ import annotations

import json
import os
import socket
import stat
import threading
import time

import pytest

import pyvt
from pyvt import control, exits

pytestmark = pytest.mark.requires_kvm

CODE = 0x1000
COUNTER = 0x5000


@pytest.fixture(autouse=True)
def runtime(tmp_path, monkeypatch):
    """Registrations go to a directory of the test's own."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "pyvt"


def counter(vm):
    return int.from_bytes(vm.memory.read(COUNTER, 8), "little")


def counting_guest(vm):
    vm.memory.write(CODE, pyvt.assemble(f"""
        .code64
    _start:
        incq {COUNTER}
        jmp _start
    """, at=CODE))
    vm.vcpu(0, mode="long").regs.rip = CODE


class Client:
    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(str(path))
        self.file = self.sock.makefile("rb")

    def send_raw(self, data: bytes):
        self.sock.sendall(data)

    def read(self) -> dict:
        line = self.file.readline()
        assert line, "the server closed the connection"
        return json.loads(line)

    def reply(self) -> dict:
        """The next message that is not an event."""
        while True:
            message = self.read()
            if "event" not in message:
                return message

    def call(self, command, **arguments):
        request = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        self.send_raw(json.dumps(request).encode() + b"\n")
        return self.reply()

    def close(self):
        self.file.close()
        self.sock.close()


@pytest.fixture
def served(vm, tmp_path):
    """A counting guest in vm.run() (a thread), its control socket, a client."""
    counting_guest(vm)
    path = tmp_path / "vm.sock"
    server = vm.serve_control(path, name="testvm")
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("exit", vm.run()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while counter(vm) == 0:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    client = Client(path)
    yield vm, server, client, path
    client.close()
    if thread.is_alive():
        vm.end_run(exits.Stopped(None))
        thread.join(30)
    result.get("exit")


def test_status_stop_cont_and_events(served):
    vm, server, client, path = served
    assert client.call("query-status") == {"return": {
        "status": "running", "running": True, "name": "testvm", "pid": os.getpid(),
        "vcpus": 1, "memory": vm.memory.size}}
    listener = Client(path)
    assert listener.call("subscribe") == {"return": {"events": list(control.EVENTS)}}
    assert client.call("stop") == {"return": {}}
    assert listener.read()["event"] == "STOP"
    frozen = counter(vm)
    time.sleep(0.1)
    assert counter(vm) == frozen
    assert client.call("query-status")["return"]["status"] == "paused"
    assert client.call("cont") == {"return": {}}
    event = listener.read()
    assert event["event"] == "RESUME" and isinstance(event["timestamp"], float)
    assert client.call("query-status")["return"]["status"] == "running"
    # The client that did not subscribe got replies only: its next message
    # is the reply to its next request.
    assert client.call("query-commands")["return"] == sorted([
        "query-status", "query-stats", "stop", "cont", "snapshot", "migrate",
        "migrate-cancel", "query-migrate", "quit", "subscribe", "unsubscribe",
        "query-commands"])
    listener.close()


def test_query_stats(served):
    vm, server, client, path = served
    first = client.call("query-stats")["return"]
    time.sleep(0.05)
    second = client.call("query-stats")["return"]
    assert second["time_ns"] > first["time_ns"]
    assert [cpu["index"] for cpu in second["vcpus"]] == [0]
    cpu = second["vcpus"][0]["stats"]
    for key in ("kvm_exits", "native_exits", "python_exits", "guest_time_ns", "exits_by_reason"):
        assert key in cpu and key in second["vm"]
    assert second["vm"]["guest_time_ns"] >= first["vm"]["guest_time_ns"]
    assert second["vm"]["dirty_pages_per_s"] == 0
    if vm.kvm.check_extension("KVM_CAP_BINARY_STATS_FD"):
        # vm.run() opened the stats fds before running: KVM's figures too.
        assert "exits" in cpu and "pages_4k" in second["vm"]


def test_snapshot_of_a_running_vm(served, tmp_path):
    vm, server, client, path = served
    target = tmp_path / "running.snap"
    reply = client.call("snapshot", path=str(target))["return"]
    assert reply == {"path": str(target), "bytes": target.stat().st_size}
    assert vm.status == "running"  # paused for the copy, then on
    snap = pyvt.Snapshot.load(target)
    try:
        saved = int.from_bytes(snap.regions[0].read(COUNTER, 8), "little")
    finally:
        snap.close()
    assert 0 < saved <= counter(vm)
    error = client.call("snapshot", path=str(tmp_path / "no" / "such" / "dir.snap"))
    assert error["error"]["class"] == "GenericError"
    assert "snapshot" in error["error"]["desc"]


def test_bad_requests_get_error_replies_on_a_live_connection(served):
    vm, server, client, path = served
    cases = [
        (b"{not json\n", "ParseError"),
        (b"[1, 2]\n", "ParseError"),
        (b'{"arguments": {}}\n', "ParseError"),
        (b'{"execute": "query-status", "extra": 1}\n', "ParseError"),
        (b'{"execute": "frobnicate"}\n', "CommandNotFound"),
        (b'{"execute": "snapshot"}\n', "InvalidArgument"),
        (b'{"execute": "snapshot", "arguments": {"path": 5}}\n', "InvalidArgument"),
        (b'{"execute": "stop", "arguments": {"now": true}}\n', "InvalidArgument"),
        (b'{"execute": "stop", "arguments": [1]}\n', "InvalidArgument"),
        (b'{"execute": "migrate", "arguments": {"uri": "tcp:x:1", "downtime_ms": "5"}}\n',
         "InvalidArgument"),
        (b"\xff\xfe\n", "ParseError"),
    ]
    for line, error_class in cases:
        client.send_raw(line)
        reply = client.reply()
        assert reply["error"]["class"] == error_class, (line, reply)
        assert reply["error"]["desc"]
    # A line far longer than MAX_LINE: one error, then the connection works.
    client.send_raw(b'{"execute": "' + b"x" * (control.MAX_LINE * 2) + b'"}\n')
    reply = client.reply()
    assert reply["error"]["class"] == "ParseError" and "longer" in reply["error"]["desc"]
    # Just over it, in one piece with its newline: refused as well.
    client.send_raw(b'{"execute": "' + b"x" * control.MAX_LINE + b'"}\n')
    reply = client.reply()
    assert reply["error"]["class"] == "ParseError" and "longer" in reply["error"]["desc"]
    # Blank lines are ignored; an id comes back.
    client.send_raw(b'\n\n{"execute": "query-status", "id": [7, "x"]}\n')
    reply = client.reply()
    assert reply["id"] == [7, "x"] and reply["return"]["status"] == "running"
    # No migration was started.
    assert client.call("query-migrate") == {"return": {"status": "none"}}
    assert client.call("migrate-cancel")["error"]["class"] == "GenericError"
    assert vm.status == "running"


def test_concurrent_clients(served):
    vm, server, client, path = served
    failures = []

    def worker(n):
        try:
            c = Client(path)
            for i in range(10):
                command = ("stop", "cont", "query-stats", "query-status")[(n + i) % 4]
                reply = c.call(command)
                if "return" not in reply:
                    failures.append(reply)
            c.close()
        except Exception as e:  # reported below
            failures.append(repr(e))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert failures == []
    client.call("cont")
    before = counter(vm)
    deadline = time.monotonic() + 30
    while counter(vm) == before:
        assert time.monotonic() < deadline, "the guest did not run on"
        time.sleep(0.01)


def test_quit_ends_the_run(vm, tmp_path):
    counting_guest(vm)
    path = tmp_path / "q.sock"
    vm.serve_control(path)
    client = Client(path)
    assert client.call("subscribe")["return"]
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("exit", vm.run()))
    thread.start()
    assert client.call("quit") == {"return": {}}
    thread.join(30)
    assert result["exit"] == exits.Quit("control socket")
    event = client.read()
    assert event["event"] == "SHUTDOWN"
    assert event["data"] == {"exit": "Quit", "description": "Quit(by control socket)"}
    client.close()


def test_socket_file_mode_registration_and_close(vm, tmp_path, runtime):
    counting_guest(vm)
    path = tmp_path / "reg.sock"
    server = vm.serve_control(path, name="reg")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_ISSOCK(os.stat(path).st_mode)
    entries = control.registered_vms()
    assert len(entries) == 1
    entry = entries[0]
    assert (entry["name"], entry["pid"], entry["socket"]) == ("reg", os.getpid(), str(path))
    assert entry["vcpus"] == 1 and entry["memory"] == vm.memory.size
    assert stat.S_IMODE(os.stat(runtime).st_mode) == 0o700
    # A dead process's entry and junk are ignored.
    (runtime / "999999999-0.json").write_text(json.dumps(
        {"name": "ghost", "pid": 999999999, "socket": "/nonexistent"}))
    (runtime / "junk.json").write_text("{")
    assert [e["name"] for e in control.registered_vms()] == ["reg"]
    client = Client(path)
    vm.close()  # closes the server with it
    assert server.closed
    assert not path.exists()
    assert control.registered_vms() == []
    try:  # the connection was closed (reset if it was never accepted)
        assert client.file.readline() == b""
    except ConnectionResetError:
        pass
    client.close()


def test_paths_that_cannot_be_served(vm, tmp_path):
    regular = tmp_path / "file"
    regular.write_text("keep me")
    with pytest.raises(pyvt.ControlError, match="not a socket"):
        vm.serve_control(regular)
    assert regular.read_text() == "keep me"
    # A live socket is someone else's.
    live = tmp_path / "live.sock"
    first = vm.serve_control(live)
    with pytest.raises(pyvt.ControlError, match="live control socket"):
        vm.serve_control(live)
    first.close()
    assert not live.exists()
    # A stale one (nobody listens) is replaced.
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()
    server = vm.serve_control(stale)
    assert Client(stale).call("query-status")["return"]["status"] == "created"
    server.close()
    with pytest.raises(pyvt.ControlError, match="too long"):
        vm.serve_control(tmp_path / ("x" * 120))
    with pytest.raises(pyvt.ControlError, match="cannot serve"):
        vm.serve_control(tmp_path / "no" / "such" / "dir.sock")
    with pytest.raises(pyvt.ArgumentError):
        vm.serve_control("")
    with pytest.raises(pyvt.ArgumentError):
        vm.serve_control(tmp_path / "n.sock", name="two\nlines")


class FakeMigration:
    """Stands in for pyvt.migration.Migration (its own tests move real VMs)."""

    def __init__(self, vm, uri, downtime_ms):
        self.vm, self.uri, self.downtime_ms = vm, uri, downtime_ms
        self.status = "active"
        self.done = False

    def info(self):
        return {"status": self.status, "uri": self.uri, "downtime_ms": None,
                "total_ms": 1.5, "transferred_bytes": 4096, "rounds": 1}

    def finish(self, status):
        self.status, self.done = status, True
        self.vm._emit_event("MIGRATION", {"status": status, "uri": self.uri})

    def cancel(self):
        self.finish("cancelled")

    def wait(self, timeout=None):
        return self


@pytest.fixture
def fake_migration(monkeypatch):
    started = []

    def start_migration(vm, uri, downtime_ms=30):
        migration = FakeMigration(vm, uri, downtime_ms)
        vm.__dict__["_fake_migration"] = migration
        started.append(migration)
        return migration

    monkeypatch.setattr(pyvt.Vm, "start_migration", start_migration, raising=False)
    monkeypatch.setattr(pyvt.Vm, "migration",
                        property(lambda vm: vm.__dict__.get("_fake_migration")), raising=False)
    return started


def test_migrate_commands_drive_the_vms_migration(served, fake_migration):
    vm, server, client, path = served
    assert client.call("subscribe")["return"]
    reply = client.call("migrate", uri="tcp:127.0.0.1:4444", downtime_ms=50)
    assert reply["return"]["status"] == "active"
    migration = fake_migration[0]
    assert (migration.uri, migration.downtime_ms) == ("tcp:127.0.0.1:4444", 50)
    assert client.call("query-migrate")["return"]["status"] == "active"
    refused = client.call("snapshot", path="/nonexistent/x.snap")["error"]
    assert "migration is under way" in refused["desc"]
    # A cont would undo the migration's own pauses (throttle, stop-and-copy).
    refused = client.call("cont")["error"]
    assert refused["class"] == "GenericError" and "migration is under way" in refused["desc"]
    # The cancel's MIGRATION event comes from this very command: it may
    # arrive before the reply.
    client.send_raw(b'{"execute": "migrate-cancel"}\n')
    messages = [client.read(), client.read()]
    assert {"return": {}} in messages
    event = next(m for m in messages if "event" in m)
    assert event["event"] == "MIGRATION"
    assert event["data"]["status"] == "cancelled"
    assert event["data"]["info"]["transferred_bytes"] == 4096  # the final figures ride along
    assert client.call("query-migrate")["return"]["status"] == "cancelled"


def test_a_subscriber_that_stops_reading_is_dropped(vm, tmp_path, monkeypatch):
    """Events are sent from the thread that makes them (a vCPU's, a
    pausing one): a client that never reads is given up on, not waited for."""
    monkeypatch.setattr(control, "SEND_TIMEOUT", 1)
    path = tmp_path / "slow.sock"
    server = vm.serve_control(path)
    slow, other = Client(path), Client(path)
    assert slow.call("subscribe")["return"]
    for _ in range(40):  # far more than the socket buffers hold
        vm._emit_event("MIGRATION", {"status": "active", "padding": "x" * 100_000})
    assert other.call("query-status")["return"]["status"] == "created"
    deadline = time.monotonic() + 30
    while len(server._clients) != 1:  # only `other` is left, once the reader sees it
        assert time.monotonic() < deadline, server._clients
        time.sleep(0.01)
    received = b""
    while True:
        chunk = slow.sock.recv(1 << 20)
        if not chunk:
            break
        received += chunk
    assert 0 < len(received) < 40 * 100_000
    slow.close()
    other.close()
