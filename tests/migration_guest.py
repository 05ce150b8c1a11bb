"""The guest the live-migration tests move (tests/guests/migrate_dirty.S),
and a small TCP proxy that breaks a migration stream on purpose.

Run as a script it is a source process for tests across network
namespaces: ``python migration_guest.py URI`` runs the guest, migrates it
to URI once it has printed some lines, streams its console to stdout and
prints the result as JSON on stderr's last line."""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import pyvt  # noqa: E402
from guestbuild import build  # noqa: E402

BUFFER = 0x200000
FLAG = 0x100000
CODE = pyvt.LOAD_ADDRESS
DEVICE_PORT = 0x560


def make_vm(lines=3000, spin=3_000_000, pages=1024, per_line=64, smp=False, device=False,
            out_dir=None, memory="16M", **vm_options):
    """A VM running the dirtying guest: vCPU 0 prints 'A<hex>' lines on the
    UART; with ``smp`` vCPU 1 prints 'B<hex>' lines on the debug console,
    writing its own buffer; with ``device`` each line also writes
    DEVICE_PORT, whose count the guest reads back at the end."""
    code = build("migrate_dirty", Path(out_dir or os.environ.get("TMPDIR", "/tmp")))
    vm = pyvt.Vm(memory, **vm_options)
    vm.memory.write(CODE, code)
    for index in range(2 if smp else 1):
        cpu = vm.vcpu(index, mode="long", ring=3)
        r = cpu.regs
        r.rip, r.rbp, r.r8, r.r9 = CODE, lines, per_line, spin
        r.rdi, r.rsi = BUFFER + index * pages * 4096, pages - 1
        r.r10, r.r11 = (ord("A"), 0x3F8) if index == 0 else (ord("B"), 0xE9)
        r.r13 = 0 if not smp else (FLAG | 1 if index == 0 else FLAG)
        r.r14 = DEVICE_PORT if device else 0
        r.rsp = 0x80000 - index * 0x10000
    return vm


class Counter:
    """A Python-handled device: writes count, a read returns the count."""

    def __init__(self):
        self.count = 0

    def __call__(self, exit):
        if exit.is_write:
            self.count += 1
            return None
        return self.count

    def attach(self, vm):
        vm.on_io(DEVICE_PORT, self)
        vm.add_state("counter", save=lambda: {"count": self.count},
                     load=lambda state: setattr(self, "count", state["count"]))


def lines_of(*outputs: bytes):
    """The lines of the outputs put end to end (a line may be cut where the
    source stopped and the destination went on)."""
    return b"".join(outputs).decode().split()


def wait_for_lines(path_or_vm, n: int, limit: float = 60.0) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if isinstance(path_or_vm, (str, Path)):
            data = Path(path_or_vm).read_bytes() if Path(path_or_vm).exists() else b""
        else:
            data = path_or_vm.console.output
        if data.count(b"\n") >= n:
            return
        time.sleep(0.01)
    raise AssertionError(f"the guest printed fewer than {n} lines in {limit} s")


class Proxy:
    """Forwards one connection to ``target`` (a (host, port)), until
    ``after`` bytes went from the source: then ``action`` ("drop": close
    both sides; "corrupt": flip a byte and go on; "stall": stop forwarding;
    "call": call ``on_trigger`` and go on)."""

    def __init__(self, target, after: int, action: str, on_trigger=None):
        self.target, self.after, self.action, self.on_trigger = target, after, action, on_trigger
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.uri = f"tcp:127.0.0.1:{self.listener.getsockname()[1]}"
        self.triggered = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        a, _ = self.listener.accept()
        b = socket.create_connection(self.target)
        threading.Thread(target=self._back, args=(b, a), daemon=True).start()
        seen = 0
        try:
            while True:
                data = a.recv(65536)
                if not data:
                    break
                if seen + len(data) > self.after and not self.triggered.is_set():
                    self.triggered.set()
                    if self.action == "drop":
                        break
                    if self.action == "stall":
                        while True:
                            if not a.recv(65536):
                                break
                        break
                    if self.action == "corrupt":
                        i = max(0, self.after - seen)
                        data = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:]
                    if self.action == "call":
                        self.on_trigger()
                seen += len(data)
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    @staticmethod
    def _back(b, a):
        try:
            while True:
                data = b.recv(65536)
                if not data:
                    break
                a.sendall(data)
        except OSError:
            pass


def main(uri: str) -> int:
    vm = make_vm()
    vm.console.stream(sys.stdout)
    result = {}

    def migrate():
        wait_for_lines(vm, 20)
        result["migration"] = vm.migrate(uri).as_dict()

    thread = threading.Thread(target=migrate)
    thread.start()
    exit = vm.run(timeout=120)
    thread.join()
    sys.stdout.flush()
    result["exit"] = repr(exit)
    print(json.dumps(result), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
