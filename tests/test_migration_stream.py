"""The migration stream, machine description and state hooks, without a
running guest: URIs, chunk checksums, SETUP checks, hook encoding, what a
VM that cannot move gets, and snapshots carrying hook state."""

import json
import mmap
import socket
import threading

import pytest

import pyvt
from pyvt import exits
from pyvt.migration import Listener, machine, state, stream
from pyvt.migration.stream import Channel


def test_uris_are_parsed_or_refused_clearly():
    assert stream.parse_uri("tcp:127.0.0.1:4444") == (socket.AF_INET, ("127.0.0.1", 4444))
    assert stream.parse_uri("tcp:[::1]:5") == (socket.AF_INET6, ("::1", 5))
    assert stream.parse_uri("unix:/tmp/x") == (socket.AF_UNIX, "/tmp/x")
    for bad in ("tcp:host", "tcp:host:99999", "udp:1:2", "", "unix:", 42):
        with pytest.raises(pyvt.MigrationError, match="URI"):
            stream.parse_uri(bad)


def _pair():
    a, b = socket.socketpair()
    return Channel(a, "a"), Channel(b, "b")


def test_chunks_round_trip_and_a_flipped_bit_fails_the_checksum():
    a, b = _pair()
    a.send(stream.STATE, 7, b"hello")
    assert b.recv(stream.STATE) == (stream.STATE, 7, b"hello")
    raw = bytearray(stream.HEAD.pack(stream.STATE, 0, 7, 5) + b"hello")
    crc = stream.head_checksum(stream.STATE, 7, 5, __import__("zlib").crc32(b"hello"))
    raw[4:8] = crc.to_bytes(4, "little")
    for flip in (8, len(raw) - 1):  # the argument, then the payload
        bad = bytearray(raw)
        bad[flip] ^= 1
        a.sock.sendall(bytes(bad))
        with pytest.raises(pyvt.MigrationError, match="checksum"):
            b.recv(stream.STATE)
    a.close(), b.close()


def test_an_error_chunk_raises_its_message_and_order_is_enforced():
    a, b = _pair()
    a.send_error("no room here")
    with pytest.raises(pyvt.MigrationError, match="no room here"):
        b.recv(stream.READY)
    a.send(stream.ACK)
    with pytest.raises(pyvt.MigrationError, match="sent ACK where READY belongs"):
        b.recv(stream.READY)
    a.sock.sendall(stream.HEAD.pack(200, 0, 0, 0))
    with pytest.raises(pyvt.MigrationError, match="unknown type 200"):
        b.recv(stream.READY)
    a.sock.sendall(stream.HEAD.pack(stream.STATE, 0, 0, stream.MAX_SMALL_PAYLOAD + 1))
    with pytest.raises(pyvt.MigrationError, match="at most"):
        b.recv(stream.STATE)
    a.close(), b.close()


def test_another_stream_version_is_refused():
    a, b = _pair()
    a.sock.sendall(stream.PREAMBLE.pack(stream.MAGIC, stream.FORMAT_VERSION + 1))
    with pytest.raises(pyvt.MigrationError, match="format 2"):
        b.expect_preamble()
    a.sock.sendall(stream.PREAMBLE.pack(b"GARBAGE!", 1))
    with pytest.raises(pyvt.MigrationError, match="does not speak"):
        b.expect_preamble()
    a.close(), b.close()


def test_hook_states_round_trip_in_the_snapshot_encoding():
    states = {"dev": {"regs": b"\x01\x02", "fifo": [1, 2, b"x"], "on": True, "name": "u"},
              "n": 5}
    assert state.decode_hooks(state.encode_hooks(states)) == states
    with pytest.raises(pyvt.MigrationError, match="malformed"):
        state.decode_hooks(b"\x05\x00\x00\x00{}")
    payload = bytearray(state.encode_hooks({"d": {"b": b"abc"}}))
    with pytest.raises(pyvt.MigrationError):
        state.decode_hooks(bytes(payload[:-1]))


def _setup(**change):
    good = {"regions": [[0, 1 << 20, False]], "vcpus": [[0, "long", 3]], "irqchip": False,
            "pit": False, "booted_irqchip": None, "pc_devices": True, "debug_exit_port": 0xF4,
            "output_limit": None, "dirty_ring": 0, "unclaimed_as_pc": True, "handlers": [],
            "hooks": [], "backend": "/dev/kvm"}
    good.update(change)
    return json.dumps(good).encode()


def test_a_malformed_setup_is_refused_before_anything_is_built():
    assert machine.parse(_setup())["vcpus"] == [[0, "long", 3]]
    for change in ({"regions": []}, {"regions": [[4096, 4096, False]]},
                   {"regions": [[0, 1000, False]]}, {"vcpus": [[0, "warp", 0]]},
                   {"handlers": [[9, 0, 1]]}, {"irqchip": 1}, {"extra": 1}):
        with pytest.raises(pyvt.MigrationError, match="SETUP is malformed"):
            machine.parse(_setup(**change))
    with pytest.raises(pyvt.MigrationError, match="not JSON"):
        machine.parse(b"{")


@pytest.mark.requires_kvm
def test_a_vm_mapping_host_memory_is_refused_before_anything_is_sent(vm):
    vm.vcpu(0, mode="long")
    host = mmap.mmap(-1, 1 << 20)
    vm.memory.map(0x10000000, host)
    with Listener("tcp:127.0.0.1:0") as listener:
        with pytest.raises(pyvt.MigrationError, match="maps host memory"):
            vm.start_migration(listener.uri)
        listener.sock.settimeout(0.2)
        with pytest.raises(socket.timeout):
            listener.sock.accept()  # nobody connected
    assert vm.migration is None


@pytest.mark.requires_kvm
def test_bad_arguments_are_refused_at_once(vm):
    vm.vcpu(0, mode="long")
    with pytest.raises(pyvt.ArgumentError):
        vm.start_migration("tcp:127.0.0.1:1", downtime_ms=0)
    with pytest.raises(pyvt.MigrationError, match="URI"):
        vm.start_migration("nowhere")


@pytest.mark.requires_kvm
def test_nobody_listening_fails_and_the_vm_is_untouched(vm):
    vm.vcpu(0, mode="long")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = vm.migrate(f"tcp:127.0.0.1:{port}")
    assert result.status == "failed" and "cannot connect" in result.error
    assert vm.status == "created" and vm.migration.info()["status"] == "failed"


@pytest.mark.requires_kvm
def test_a_vm_that_has_not_run_yet_moves_and_runs_at_the_destination(vm):
    code = pyvt.assemble("mov $0x3f8, %dx; mov $'k', %al; out %al, %dx; hlt", at=0x1000,
                         bits=64)
    vm.memory.write(0x1000, code)
    cpu = vm.vcpu(0, mode="long", ring=3)
    cpu.regs.rip = 0x1000
    listener = Listener("unix:" + f"/tmp/pyvt-mig-{id(vm)}.sock")
    got = {}
    thread = threading.Thread(target=lambda: got.setdefault("vm", pyvt.Vm.incoming(listener)))
    thread.start()
    result = vm.migrate(listener.uri)
    thread.join(60)
    assert result.status == "completed", result
    assert isinstance(vm.run(), exits.Migrated)  # the source never runs it
    with got["vm"] as moved:
        assert isinstance(moved.run(timeout=30), exits.Hlt)
        assert moved.console.output == b"k"
        assert moved.vcpus[0].ring == 3


@pytest.mark.requires_kvm
def test_snapshots_carry_state_hooks(vm):
    box = {"value": 1}
    vm.vcpu(0, mode="long")
    vm.add_state("box", save=lambda: dict(box), load=lambda s: box.update(s))
    snap = vm.snapshot()
    assert snap.hooks == {"box": {"value": 1}}
    box["value"] = 99
    vm.restore(snap)
    assert box == {"value": 1}
    with pytest.raises(pyvt.ArgumentError, match="exists already"):
        vm.add_state("box", save=dict, load=print)
    vm.remove_state("box")
    with pytest.raises(pyvt.SnapshotError, match="no such hook"):
        vm.restore(snap)
    vm.add_state("bad", save=lambda: object(), load=print)
    with pytest.raises(pyvt.SnapshotError, match="cannot hold object"):
        vm.snapshot()
    snap.close()


@pytest.mark.requires_kvm
def test_a_vm_with_a_pci_bus_is_refused_before_anything_is_sent(vm):
    vm.vcpu(0, mode="long")
    vm.pci  # noqa: B018 (made on first use)
    with pytest.raises(pyvt.MigrationError, match="PCI bus"):
        vm.start_migration("tcp:127.0.0.1:9")
