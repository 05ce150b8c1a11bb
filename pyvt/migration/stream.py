"""The live-migration stream: how a running VM travels from ``vm.migrate``
(the source) to ``pyvt.Vm.incoming`` (the destination).  Format version 1.

Transport: one TCP connection (``tcp:HOST:PORT``) or Unix stream socket
(``unix:PATH``), the destination listening.  Both sides speak chunks.

Preamble
    Each side first sends ``MAGIC`` (8 bytes, ``b"PYVTMIGR"``) and the
    format version as a little-endian u32.  A side that reads another magic
    or version says so in an ``ERROR`` chunk (if it can) and closes.

Chunk
    A 24-byte head, ``<BxxxIQQ``: the chunk type (u8, 3 pad bytes), a
    CRC-32 (zlib's) of the head's type, argument and length fields packed
    the same way with a zero checksum, followed by the payload; the
    argument (u64, meaning per type); the payload length (u64).  Then the
    payload.  A chunk whose checksum does not match, whose type is unknown
    or out of order, or whose length is out of bounds ends the migration:
    the destination answers ``ERROR`` and drops the VM; the source resumes.

Chunk types, in stream order (S: source to destination, D: the reverse)
    ``SETUP`` (S, arg 0): JSON: memory regions (gpa, size, readonly), vCPUs
    (index, mode, ring), whether there are an in-kernel irqchip and PIT,
    the PC devices, the debug-exit port, the Python handlers' ranges and
    the state hooks' names (:mod:`pyvt.migration.machine`).  The
    destination builds the machine from it (memory, vCPUs, irqchip, PIT,
    devices), runs the caller's ``setup(vm)`` to register Python handlers
    and state hooks, checks that they match, then answers
    ``READY`` (D, arg 0, no payload) or ``ERROR``.

    ``PAGES`` (S, arg = guest-physical address): page-aligned guest memory,
    a whole number of pages inside one region.  The first round sends every
    page that is not zero (the destination's memory starts zeroed), later
    rounds the pages written since the round before (KVM's dirty ring or
    bitmap), the last round, with the VM paused, what is still dirty.
    ``ROUND`` (S, arg = the round number that ends, no payload) closes a
    round.

    ``STATE`` (S, arg 0): everything but memory, with the source paused: a
    pyvt snapshot file (:mod:`pyvt.snapshot_file`, its own format version
    and SHA-256) whose regions hold no pages, carrying every vCPU
    (registers, XSAVE, MSRs with the TSC, LAPIC, events, debug registers,
    MP state, CPUID), the KVM clock, the irqchip, the PIT and every native
    device with its state (the consoles' registers and output kept: the
    destination's stream starts where the source's stopped).  The
    destination checks it as ``Snapshot.load`` does, CPUID included.
    ``HOOKS`` (S, arg 0): the state of every ``vm.add_state`` hook, encoded
    as snapshot files encode device states (JSON; bytes become blob
    numbers): a u32 JSON length, the JSON ``{"states": ..., "blobs":
    [lengths]}``, the blobs.

    ``END`` (S, arg = how many ``PAGES`` chunks were sent in all).  The
    destination checks the count, loads the state and answers ``ACK`` (D):
    it holds the whole VM, ready to run.  Then the source sends ``COMMIT``
    (S): from here the VM is the destination's, the source's run ends with
    :class:`pyvt.exits.Migrated`.  The destination answers ``RUNNING`` (D)
    and returns the VM; the source's downtime is from its pause to that
    answer.  A destination never runs a VM without ``COMMIT``; a source
    resumes on anything but ``ACK`` (an ``ERROR``, a closed connection, a
    timeout, a cancel).

    ``ERROR`` (either side, arg 0): a UTF-8 message, then the sender closes.
"""

from __future__ import annotations

import select
import socket
import struct
import time
import zlib
from typing import Any, Optional, Tuple

from ..errors import MigrationError

FORMAT_VERSION = 1
MAGIC = b"PYVTMIGR"
PREAMBLE = struct.Struct("<8sI")
HEAD = struct.Struct("<BxxxIQQ")

SETUP, READY, PAGES, ROUND, STATE, HOOKS, END, ACK, COMMIT, RUNNING, ERROR = range(1, 12)
NAMES = {SETUP: "SETUP", READY: "READY", PAGES: "PAGES", ROUND: "ROUND", STATE: "STATE",
         HOOKS: "HOOKS", END: "END", ACK: "ACK", COMMIT: "COMMIT", RUNNING: "RUNNING",
         ERROR: "ERROR"}

#: The largest payload other than PAGES (JSON, state, messages).
MAX_SMALL_PAYLOAD = 64 << 20
#: PAGES payloads are at most this (the source sends 1 MiB).
MAX_PAGES_PAYLOAD = 16 << 20


def head_checksum(kind: int, arg: int, length: int, payload_crc: int = 0) -> int:
    return zlib.crc32(HEAD.pack(kind, 0, arg, length), payload_crc)


def parse_uri(uri: str) -> Tuple[int, Any]:
    """``(family, address)`` for ``tcp:HOST:PORT`` (IPv6 hosts in
    brackets) or ``unix:PATH``."""
    if not isinstance(uri, str):
        raise MigrationError(f"a migration URI is a str like 'tcp:HOST:PORT', not {uri!r}")
    scheme, _, rest = uri.partition(":")
    if scheme == "unix" and rest:
        return socket.AF_UNIX, rest
    if scheme == "tcp":
        host, sep, port = rest.rpartition(":")
        if sep and port.isdigit() and int(port) < 65536:
            host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            return family, (host or "0.0.0.0", int(port))
    raise MigrationError(f"bad migration URI {uri!r}: use tcp:HOST:PORT or unix:PATH")


def connect(uri: str, timeout: float) -> "Channel":
    family, address = parse_uri(uri)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(address)
    except OSError as e:
        sock.close()
        raise MigrationError(f"cannot connect to {uri}: {e.strerror or e}") from None
    return Channel(sock, uri)


class Channel:
    """One end of a migration stream: chunks in and out, checked."""

    def __init__(self, sock: socket.socket, peer: str):
        self.sock = sock
        self.peer = peer
        if sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sent_bytes = 0

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    # -- sending -------------------------------------------------------------

    def send_preamble(self) -> None:
        self._send(PREAMBLE.pack(MAGIC, FORMAT_VERSION))

    def send(self, kind: int, arg: int = 0, payload=b"") -> None:
        crc = zlib.crc32(payload)
        head = HEAD.pack(kind, head_checksum(kind, arg, len(payload), crc), arg, len(payload))
        if len(payload) < 65536:
            self._send(head + bytes(payload))
        else:
            self._send(head)
            self._send(payload)

    def _send(self, data) -> None:
        try:
            self.sock.sendall(data)
        except OSError as e:
            self.raise_peer_error(1.0)  # the peer's reason, if it said one
            raise MigrationError(f"the connection to {self.peer} failed: "
                                 f"{e.strerror or e}") from None
        self.sent_bytes += len(data)

    def raise_peer_error(self, wait: float = 0.0) -> None:
        """Raises the peer's ERROR (or its closing) if one has arrived
        (within ``wait`` seconds): the source checks between chunks, so a
        destination's refusal stops it at once."""
        try:
            ready, _, _ = select.select([self.sock], [], [], wait)
        except (OSError, ValueError):
            return
        if ready:
            self.settimeout(max(wait, 1.0))
            self.recv()  # an ERROR chunk raises its message; anything else is out of order

    def linger_close(self, limit: float = 2.0) -> None:
        """Closes after the peer has seen our last chunk: reads (and drops)
        what it still sends until it closes, so that our close does not
        reset the connection and destroy the ERROR chunk unread."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + limit
            while time.monotonic() < deadline:
                ready, _, _ = select.select([self.sock], [], [], deadline - time.monotonic())
                if not ready or not self.sock.recv(1 << 16):
                    break
        except OSError:
            pass
        self.close()

    def send_error(self, message: str) -> None:
        """Best effort: the peer may be gone already."""
        try:
            self.send(ERROR, 0, message.encode("utf-8", "replace")[:4096])
        except MigrationError:
            pass

    # -- receiving -----------------------------------------------------------

    def recv_exact(self, n: int) -> bytes:
        buf = bytearray(n)
        self.recv_into(memoryview(buf))
        return bytes(buf)

    def recv_into(self, view: memoryview) -> None:
        done = 0
        while done < len(view):
            try:
                got = self.sock.recv_into(view[done:])
            except socket.timeout:
                raise MigrationError(f"{self.peer} sent nothing in time") from None
            except OSError as e:
                raise MigrationError(f"the connection to {self.peer} failed: "
                                     f"{e.strerror or e}") from None
            if not got:
                raise MigrationError(f"{self.peer} closed the connection mid-stream")
            done += got

    def expect_preamble(self) -> None:
        magic, version = PREAMBLE.unpack(self.recv_exact(PREAMBLE.size))
        if magic != MAGIC:
            raise MigrationError(f"{self.peer} does not speak pyvt's migration stream")
        if version != FORMAT_VERSION:
            raise MigrationError(f"{self.peer} speaks migration stream format {version}, "
                                 f"this pyvt format {FORMAT_VERSION}")

    def recv_head(self) -> Tuple[int, int, int, int]:
        """(type, checksum, arg, length) of the next chunk, its length bounded."""
        kind, crc, arg, length = HEAD.unpack(self.recv_exact(HEAD.size))
        if kind not in NAMES:
            raise MigrationError(f"{self.peer} sent a chunk of unknown type {kind}")
        limit = MAX_PAGES_PAYLOAD if kind == PAGES else MAX_SMALL_PAYLOAD
        if length > limit:
            raise MigrationError(f"{self.peer} sent a {NAMES[kind]} chunk of {length} bytes "
                                 f"(at most {limit})")
        return kind, crc, arg, length

    def check(self, kind: int, crc: int, arg: int, payload) -> None:
        if head_checksum(kind, arg, len(payload), zlib.crc32(payload)) != crc:
            raise MigrationError(f"a {NAMES[kind]} chunk from {self.peer} fails its checksum")

    def recv(self, *wanted: int) -> Tuple[int, int, bytes]:
        """The next chunk, which must be one of ``wanted`` (an ERROR chunk
        raises its message): (type, arg, payload)."""
        kind, crc, arg, length = self.recv_head()
        payload = self.recv_exact(length)
        self.check(kind, crc, arg, payload)
        return self.accept(kind, arg, payload, wanted)

    def accept(self, kind: int, arg: int, payload: bytes, wanted) -> Tuple[int, int, bytes]:
        if kind == ERROR:
            raise MigrationError(f"{self.peer}: {payload.decode('utf-8', 'replace')}")
        if kind not in wanted:
            raise MigrationError(f"{self.peer} sent {NAMES[kind]} where "
                                 f"{' or '.join(NAMES[w] for w in wanted)} belongs")
        return kind, arg, payload

    def settimeout(self, timeout: Optional[float]) -> None:
        self.sock.settimeout(timeout)


__all__ = ["FORMAT_VERSION", "MAGIC", "Channel", "connect", "parse_uri"]
