"""A gdb stub: the GDB remote serial protocol over TCP, for a :class:`pyvt.Vm`.

``vm.gdb_server("localhost:1234")`` (or ``pyvt run/boot --gdb 1234``) waits
for ``target remote :1234``.  All-stop mode: every vCPU is stopped while gdb
looks; ``c`` runs them all (one thread each), ``s`` steps the current one;
Ctrl-C (0x03) stops a running guest.  Threads are vCPUs (thread id = index
+ 1).  Memory addresses are guest-virtual, translated through the vCPU's page
tables (physical with paging off).  Breakpoints and watchpoints are
:mod:`pyvt.debugging`'s.  When the guest ends (debug-exit, hlt without an
irqchip, a reset, a failure) gdb gets ``W`` (an exit status) or ``X`` (a
signal) and :attr:`GdbServer.final_exit` holds the exit.
"""

from __future__ import annotations

import logging
import queue
import select
import socket
import struct
import threading
from typing import Callable, List, Optional, Tuple

from . import debugging, exits
from ._kvm import ffi
from .errors import ArgumentError, Error

log = logging.getLogger("pyvt.gdbstub")

INTERRUPT = 0x03
SIGINT, SIGTRAP, SIGABRT, SIGSEGV = 2, 5, 6, 11
_ESCAPED = b"#$}*"
MAX_PACKET = 0x4000

# -- the packet layer ---------------------------------------------------------


def checksum(data: bytes) -> int:
    """The modulo-256 sum a packet carries after its ``#``."""
    return sum(data) & 0xFF


def escape(data: bytes) -> bytes:
    """Binary data with ``# $ } *`` escaped (``}`` then the byte xor 0x20)."""
    out = bytearray()
    for b in data:
        if b in _ESCAPED:
            out += bytes((0x7D, b ^ 0x20))
        else:
            out.append(b)
    return bytes(out)


def unescape(data: bytes) -> bytes:
    """The inverse of :func:`escape` (X packets, binary writes)."""
    out = bytearray()
    it = iter(data)
    for b in it:
        if b == 0x7D:
            nxt = next(it, None)
            if nxt is None:
                raise ArgumentError("binary data ends in an escape character")
            out.append(nxt ^ 0x20)
        else:
            out.append(b)
    return bytes(out)


def frame(payload: bytes) -> bytes:
    """``$payload#cs``, escaped."""
    body = escape(payload)
    return b"$" + body + b"#" + b"%02x" % checksum(body)


class PacketReader:
    """Splits what gdb sends into events: ``("packet", payload)``,
    ``("interrupt", None)``, ``("bad", raw)`` for a checksum that does not
    match.  Acks (+/-) are consumed.  Never raises on any input."""

    def __init__(self):
        self._buffer = bytearray()

    def feed(self, data: bytes) -> List[Tuple[str, Optional[bytes]]]:
        self._buffer += data
        events: List[Tuple[str, Optional[bytes]]] = []
        while self._buffer:
            first = self._buffer[0]
            if first == INTERRUPT:
                del self._buffer[0]
                events.append(("interrupt", None))
            elif first == ord("$"):
                end = self._buffer.find(b"#")
                if end < 0 or len(self._buffer) < end + 3:
                    if len(self._buffer) > 2 * MAX_PACKET:  # never ends: drop it
                        events.append(("bad", bytes(self._buffer)))
                        self._buffer.clear()
                    break
                body = bytes(self._buffer[1:end])
                sent = bytes(self._buffer[end + 1:end + 3])
                del self._buffer[:end + 3]
                try:
                    good = int(sent, 16) == checksum(body)
                except ValueError:
                    good = False
                events.append(("packet", body) if good else ("bad", body))
            else:  # '+', '-', or noise between packets
                del self._buffer[0]
        return events


# -- registers: gdb's amd64 layout, then fs_base/gs_base, then control regs ------

_GENERAL = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
            "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
_SEGMENTS = ("cs", "ss", "ds", "es", "fs", "gs")
_X87_CONTROL = ("fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop")
_CONTROL = ("cr0", "cr2", "cr3", "cr4", "efer")


def _register_table() -> List[Tuple[str, int, str]]:
    """(name, bytes, gdb type) in gdb's register order."""
    table = [(r, 8, "int64") for r in _GENERAL]
    table += [("rip", 8, "code_ptr"), ("eflags", 4, "i386_eflags")]
    table += [(s, 4, "int32") for s in _SEGMENTS]
    table += [(f"st{i}", 10, "i387_ext") for i in range(8)]
    table += [(f, 4, "int") for f in _X87_CONTROL]
    table += [(f"xmm{i}", 16, "vec128") for i in range(16)]
    table += [("mxcsr", 4, "i386_mxcsr")]
    table += [("fs_base", 8, "int"), ("gs_base", 8, "int")]
    table += [(c, 8, "int") for c in _CONTROL]
    return table


REGISTERS = _register_table()
_INDEX = {name: i for i, (name, _, _) in enumerate(REGISTERS)}


def _target_xml() -> bytes:
    def regs(names, feature):
        lines = [f'<feature name="{feature}">']
        if feature == "org.gnu.gdb.i386.sse":
            lines.append('<vector id="v4f" type="ieee_single" count="4"/>'
                         '<vector id="v2d" type="ieee_double" count="2"/>'
                         '<vector id="v16i8" type="int8" count="16"/>'
                         '<vector id="v8i16" type="int16" count="8"/>'
                         '<vector id="v4i32" type="int32" count="4"/>'
                         '<vector id="v2i64" type="int64" count="2"/>'
                         '<union id="vec128"><field name="v4_float" type="v4f"/>'
                         '<field name="v2_double" type="v2d"/><field name="v16_int8" type="v16i8"/>'
                         '<field name="v8_int16" type="v8i16"/><field name="v4_int32" type="v4i32"/>'
                         '<field name="v2_int64" type="v2i64"/><field name="uint128" type="uint128"/>'
                         '</union><flags id="i386_mxcsr" size="4"><field name="IE" start="0" end="0"/>'
                         '</flags>')
        if feature == "org.gnu.gdb.i386.core":
            lines.append('<flags id="i386_eflags" size="4">' + "".join(
                f'<field name="{n}" start="{b}" end="{b}"/>' for n, b in (
                    ("CF", 0), ("PF", 2), ("AF", 4), ("ZF", 6), ("SF", 7), ("TF", 8),
                    ("IF", 9), ("DF", 10), ("OF", 11), ("NT", 14), ("RF", 16), ("VM", 17),
                    ("AC", 18), ("VIF", 19), ("VIP", 20), ("ID", 21))) + "</flags>")
        for name in names:
            _, size, kind = REGISTERS[_INDEX[name]]
            group = ' group="float"' if name in _X87_CONTROL else ""
            group = ' group="system"' if name in _CONTROL else group
            lines.append(f'<reg name="{name}" bitsize="{size * 8}" type="{kind}" '
                         f'regnum="{_INDEX[name]}"{group}/>')
        return "\n".join(lines + ["</feature>"])

    core = [n for n, _, _ in REGISTERS[:_INDEX["xmm0"]]]
    sse = [f"xmm{i}" for i in range(16)] + ["mxcsr"]
    return ('<?xml version="1.0"?>\n<!DOCTYPE target SYSTEM "gdb-target.dtd">\n'
            "<target><architecture>i386:x86-64</architecture>\n"
            + regs(core, "org.gnu.gdb.i386.core") + "\n"
            + regs(sse, "org.gnu.gdb.i386.sse") + "\n"
            + regs(["fs_base", "gs_base"], "org.gnu.gdb.i386.segments") + "\n"
            + regs(list(_CONTROL), "org.pyvt.x86.control") + "\n</target>\n").encode()


TARGET_XML = _target_xml()


class _RegisterFile:
    """Reads and writes one vCPU's registers in gdb's numbering."""

    def __init__(self, cpu):
        self.cpu = cpu

    def read(self, index: int) -> bytes:
        name, size, _ = REGISTERS[index]
        cpu = self.cpu
        if name in _GENERAL or name in ("rip", "eflags"):
            value = getattr(cpu.regs, "rflags" if name == "eflags" else name)
        elif name in _SEGMENTS:
            value = getattr(cpu.sregs, name).selector
        elif name in ("fs_base", "gs_base"):
            value = getattr(cpu.sregs, name[:2]).base
        elif name in _CONTROL:
            value = getattr(cpu.sregs, name)
        else:
            return self._read_fpu(name, size)
        return (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def _read_fpu(self, name: str, size: int) -> bytes:
        fpu = self.cpu.fd.get_fpu()
        if name.startswith("st"):
            return bytes(fpu.fpr[int(name[2:])][0:10])
        if name.startswith("xmm"):
            return bytes(fpu.xmm[int(name[3:])][0:16])
        values = {"fctrl": fpu.fcw, "fstat": fpu.fsw, "ftag": _full_tag(fpu.ftwx),
                  "fop": fpu.last_opcode, "fioff": fpu.last_ip & 0xFFFFFFFF,
                  "fooff": fpu.last_dp & 0xFFFFFFFF, "mxcsr": fpu.mxcsr}
        return values.get(name, 0).to_bytes(size, "little")

    def write(self, index: int, data: bytes) -> None:
        name, size, _ = REGISTERS[index]
        if len(data) != size:
            raise ArgumentError(f"register {name} takes {size} bytes, not {len(data)}")
        value = int.from_bytes(data, "little")
        cpu = self.cpu
        if name in _GENERAL or name == "rip":
            setattr(cpu.regs, name, value)
        elif name == "eflags":
            cpu.regs.rflags = value
        elif name in _SEGMENTS:
            segment = getattr(cpu.sregs, name)
            segment.selector = value & 0xFFFF
        elif name in ("fs_base", "gs_base"):
            getattr(cpu.sregs, name[:2]).base = value
        elif name in _CONTROL:
            setattr(cpu.sregs, name, value)
        elif name.startswith(("st", "xmm")) or name in ("fctrl", "fstat", "mxcsr"):
            fpu = cpu.fd.get_fpu()
            if name.startswith("st"):
                ffi.memmove(fpu.fpr[int(name[2:])], data, 10)
            elif name.startswith("xmm"):
                ffi.memmove(fpu.xmm[int(name[3:])], data, 16)
            else:
                setattr(fpu, {"fctrl": "fcw", "fstat": "fsw", "mxcsr": "mxcsr"}[name], value)
            cpu.fd.set_fpu(fpu)
        # ftag, fiseg, fioff, foseg, fooff, fop: KVM_SET_FPU keeps its own.


def _full_tag(abridged: int) -> int:
    """FXSAVE's abridged tag byte as the x87 16-bit tag word (valid/empty)."""
    return sum((0 if abridged & (1 << i) else 3) << (2 * i) for i in range(8))


# -- the server -----------------------------------------------------------------


def parse_address(address) -> Tuple[str, int]:
    """``"[HOST:]PORT"``, a port number or ``(host, port)`` -> (host, port);
    the host is localhost unless given."""
    if isinstance(address, tuple) and len(address) == 2:
        host, port = address
    elif isinstance(address, int) and not isinstance(address, bool):
        host, port = "localhost", address
    elif isinstance(address, str):
        host, _, port_text = address.rpartition(":")
        host = host or "localhost"
        try:
            port = int(port_text)
        except ValueError:
            raise ArgumentError(f"a gdb address is [HOST:]PORT, not {address!r}") from None
    else:
        raise ArgumentError(f"a gdb address is [HOST:]PORT, a port or (host, port), "
                            f"not {address!r}")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 0xFFFF:
        raise ArgumentError(f"a TCP port is 0-65535, not {port!r}")
    return host.strip("[]"), port


class GdbServer:
    """Serves one :class:`pyvt.Vm` to one gdb connection at a time."""

    def __init__(self, vm, address="localhost:1234"):
        self.vm = vm
        host, port = parse_address(address)
        self.debugger = debugging.debugger(vm)
        if not vm.vcpus:
            raise Error("the gdb stub debugs vCPUs: create them (vm.vcpu(), vm.boot()) first")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._listener.bind((host, port))
        except OSError as e:
            self._listener.close()
            raise Error(f"the gdb stub cannot listen on {host}:{port}: {e.strerror}") from None
        self._listener.listen(1)
        #: (host, port) it listens on (port 0 asks for a free one).
        self.address = self._listener.getsockname()[:2]
        #: How the guest ended under gdb (None: it has not, or gdb detached/killed).
        self.final_exit: Optional[exits.AnyExit] = None
        #: "ended", "detached", "killed" or "disconnected" once serve() returns.
        self.outcome: Optional[str] = None
        self._thread: Optional[threading.Thread] = None
        self._conn: Optional[socket.socket] = None
        self._reader = PacketReader()
        cpus = sorted(vm.vcpus)
        self._current = {"g": cpus[0], "c": cpus[0]}
        self._last_stop = self._stop_reply(SIGTRAP, cpus[0])
        log.debug("gdb stub listening on %s:%d", *self.address)

    # -- serving ----------------------------------------------------------------

    def start(self) -> None:
        """Serves from a daemon thread."""
        self._thread = threading.Thread(target=self.serve, name="pyvt-gdbstub", daemon=True)
        self._thread.start()

    def join(self, timeout: Optional[float] = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def serve(self) -> Optional[exits.AnyExit]:
        """Waits for gdb and serves it until it detaches or kills, the
        connection drops, or the guest ends; returns :attr:`final_exit`."""
        try:
            conn, peer = self._listener.accept()
        finally:
            self._listener.close()
        log.info("gdb connected from %s", peer[0])
        self._conn = conn
        try:
            with conn:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                while self.outcome is None:
                    data = self._recv()
                    if not data:
                        self.outcome = "disconnected"
                        break
                    for kind, payload in self._reader.feed(data):
                        if kind == "bad":
                            conn.sendall(b"-")
                        elif kind == "packet":
                            conn.sendall(b"+")
                            self._handle(payload)
                        if self.outcome is not None:
                            break
        finally:
            if self.outcome != "ended" and not self.vm.closed:
                self._clear_points()
        return self.final_exit

    def _recv(self) -> bytes:
        assert self._conn is not None  # serve() accepted it
        try:
            return self._conn.recv(65536)
        except OSError:
            return b""

    def _send(self, payload: bytes) -> None:
        assert self._conn is not None
        try:
            self._conn.sendall(frame(payload))
        except OSError:
            self.outcome = "disconnected"

    # -- packets ------------------------------------------------------------------

    def _handle(self, packet: bytes) -> None:
        try:
            reply = self._dispatch(packet)
        except (Error, ValueError, IndexError, KeyError, struct.error) as e:
            log.warning("gdb packet %r failed: %s", packet[:40], e)
            reply = b"E16"  # EINVAL; the message is in the stub's log
        if reply is not None:
            self._send(reply)

    def _dispatch(self, packet: bytes) -> Optional[bytes]:
        if not packet:
            return b""
        command, rest = chr(packet[0]), packet[1:]
        handler: Optional[Callable] = {
            "?": lambda r: self._last_stop,
            "g": self._read_all_registers, "G": self._write_all_registers,
            "p": self._read_register, "P": self._write_register,
            "m": self._read_memory, "M": self._write_memory, "X": self._write_binary,
            "c": self._continue, "s": self._step, "H": self._set_thread,
            "T": self._thread_alive, "Z": self._insert_point, "z": self._remove_point,
            "D": self._detach, "k": self._kill, "q": self._query, "v": self._v_packet,
        }.get(command)
        return b"" if handler is None else handler(rest)

    def _cpu(self, which: str = "g"):
        return self.vm.vcpus[self._current[which]]

    def _thread_id(self, text: bytes) -> Optional[int]:
        """A thread id -> vCPU index; None for 0 (any) and -1 (all)."""
        if text in (b"-1", b"0"):
            return None
        index = int(text, 16) - 1
        if index not in self.vm.vcpus:
            raise ArgumentError(f"there is no thread {text.decode()} (vCPU {index})")
        return index

    def _set_thread(self, rest: bytes) -> bytes:
        which, thread = chr(rest[0]), rest[1:]
        index = self._thread_id(thread)
        self._current[which] = min(self.vm.vcpus) if index is None else index
        return b"OK"

    def _thread_alive(self, rest: bytes) -> bytes:
        self._thread_id(rest)
        return b"OK"

    def _query(self, rest: bytes) -> bytes:
        if rest.startswith(b"Supported"):
            return (b"PacketSize=%x;qXfer:features:read+;swbreak+;hwbreak+;vContSupported+"
                    % MAX_PACKET)
        if rest.startswith(b"Xfer:features:read:target.xml:"):
            offset, length = (int(v, 16) for v in rest.split(b":")[-1].split(b","))
            chunk = TARGET_XML[offset:offset + length]
            return (b"m" if offset + length < len(TARGET_XML) else b"l") + chunk
        if rest == b"fThreadInfo":
            return b"m" + b",".join(b"%x" % (i + 1) for i in sorted(self.vm.vcpus))
        if rest == b"sThreadInfo":
            return b"l"
        if rest == b"C":
            return b"QC%x" % (self._current["g"] + 1)
        if rest == b"Attached":
            return b"1"
        if rest.startswith(b"ThreadExtraInfo,"):
            index = self._thread_id(rest.split(b",")[1])
            return f"vCPU {index}".encode().hex().encode()
        return b""

    def _v_packet(self, rest: bytes) -> Optional[bytes]:
        if rest == b"Cont?":
            return b"vCont;c;C;s;S"
        if rest.startswith(b"Cont;"):
            step = None
            for action in rest[5:].split(b";"):
                kind, _, thread = action.partition(b":")
                if kind[:1] in (b"s", b"S"):
                    index = self._thread_id(thread) if thread else None
                    step = self._current["c"] if index is None else index
            if step is not None:
                return self._run_step(step)
            return self._run_all()
        if rest == b"MustReplyEmpty":
            return b""
        if rest.startswith(b"Kill"):
            return self._kill(b"")
        return b""

    # registers

    def _read_all_registers(self, rest: bytes) -> bytes:
        regs = _RegisterFile(self._cpu())
        return b"".join(regs.read(i).hex().encode() for i in range(len(REGISTERS)))

    def _write_all_registers(self, rest: bytes) -> bytes:
        data = bytes.fromhex(rest.decode())
        regs = _RegisterFile(self._cpu())
        offset = 0
        for i, (_, size, _) in enumerate(REGISTERS):
            if offset + size > len(data):
                break
            chunk = data[offset:offset + size]
            if regs.read(i) != chunk:
                regs.write(i, chunk)
            offset += size
        return b"OK"

    def _read_register(self, rest: bytes) -> bytes:
        index = int(rest, 16)
        if index >= len(REGISTERS):
            return b"E16"
        return _RegisterFile(self._cpu()).read(index).hex().encode()

    def _write_register(self, rest: bytes) -> bytes:
        number, _, value = rest.partition(b"=")
        index = int(number, 16)
        if index >= len(REGISTERS):
            return b"E16"
        _RegisterFile(self._cpu()).write(index, bytes.fromhex(value.decode()))
        return b"OK"

    # memory

    def _span(self, text: bytes) -> Tuple[int, int]:
        address, _, length = text.partition(b",")
        address_value, length_value = int(address, 16), int(length, 16)
        if length_value > MAX_PACKET:
            raise ArgumentError(f"at most {MAX_PACKET:#x} bytes a packet, not {length_value:#x}")
        return address_value, length_value

    def _read_memory(self, rest: bytes) -> bytes:
        address, length = self._span(rest)
        try:
            data = bytearray(debugging.read_virtual(self._cpu(), address, length))
        except Error:
            return b"E14"  # EFAULT: not mapped or not RAM
        for point in self.debugger.breakpoints:  # gdb sees the code, not our int3
            if point.via == "int3" and address <= point.address < address + length:
                data[point.address - address] = point.saved
        return bytes(data).hex().encode()

    def _write_memory(self, rest: bytes) -> bytes:
        span, _, hexdata = rest.partition(b":")
        address, length = self._span(span)
        return self._write(address, bytes.fromhex(hexdata.decode())[:length])

    def _write_binary(self, rest: bytes) -> bytes:
        span, _, data = rest.partition(b":")
        address, length = self._span(span)
        return self._write(address, unescape(data)[:length])

    def _write(self, address: int, data: bytes) -> bytes:
        try:
            debugging.write_virtual(self._cpu(), address, data)
        except Error:
            return b"E14"
        return b"OK"

    # breakpoints and watchpoints

    def _point(self, rest: bytes) -> Tuple[int, int, int]:
        kind, address, length = rest.split(b";")[0].split(b",")
        return int(kind), int(address, 16), int(length, 16)

    def _insert_point(self, rest: bytes) -> bytes:
        kind, address, length = self._point(rest)
        try:
            if kind in (0, 1):
                self.vm.breakpoints.add(address, "sw" if kind == 0 else "hw")
            elif kind in (2, 3, 4):
                self.vm.watchpoints.add(address, length, "w" if kind == 2 else "rw")
            else:
                return b""
        except Error as e:
            log.warning("%s", e)
            return b"E1c"  # ENOSPC (all debug registers taken) or refused
        return b"OK"

    def _remove_point(self, rest: bytes) -> bytes:
        kind, address, _ = self._point(rest)
        points = self.vm.breakpoints if kind in (0, 1) else self.vm.watchpoints
        if kind > 4:
            return b""
        if address in points:
            points.remove(address)
        return b"OK"

    def _clear_points(self) -> None:
        for point in list(self.vm.breakpoints):
            self.vm.breakpoints.remove(point.address)
        for point in list(self.vm.watchpoints):
            self.vm.watchpoints.remove(point.address)

    # running

    def _set_pc(self, rest: bytes) -> None:
        if rest:
            self._cpu("c").regs.rip = int(rest.split(b";")[0], 16)

    def _continue(self, rest: bytes) -> Optional[bytes]:
        self._set_pc(rest)
        return self._run_all()

    def _step(self, rest: bytes) -> Optional[bytes]:
        self._set_pc(rest)
        return self._run_step(self._current["c"])

    def _run_step(self, index: int) -> Optional[bytes]:
        cpu = self.vm.vcpus[index]
        return self._after([(index, cpu.step())])

    def _run_all(self) -> Optional[bytes]:
        """Resumes every vCPU, one thread each, until one stops or gdb
        interrupts; then stops the others."""
        results: "queue.Queue[Tuple[int, object]]" = queue.Queue()
        cpus = [self.vm.vcpus[i] for i in sorted(self.vm.vcpus)]

        def worker(cpu):
            try:
                results.put((cpu.index, self.debugger.resume(cpu)))
            except BaseException as e:  # reported to gdb below
                results.put((cpu.index, e))

        threads = [threading.Thread(target=worker, args=(cpu,), daemon=True,
                                    name=f"pyvt-gdb-vcpu{cpu.index}") for cpu in cpus]
        for t in threads:
            t.start()
        outcomes: List[Tuple[int, object]] = []
        interrupted = False
        while not outcomes:
            try:
                outcomes.append(results.get(timeout=0.02))
            except queue.Empty:
                pass
            if not outcomes and self._interrupt_arrived():
                interrupted = True
                break
        for cpu in cpus:
            self.debugger.stop(cpu)
        for t in threads:
            while t.is_alive():
                t.join(0.05)
                if t.is_alive():
                    self.debugger.stop(cpus[threads.index(t)])
        while not results.empty():
            outcomes.append(results.get())
        if interrupted:
            real = [o for o in outcomes if not isinstance(o[1], exits.Stopped)]
            if not real:
                index = self._current["c"]
                self._last_stop = self._stop_reply(SIGINT, index)
                return self._last_stop
            outcomes = real
        return self._after(outcomes)

    def _interrupt_arrived(self) -> bool:
        assert self._conn is not None
        ready, _, _ = select.select([self._conn], [], [], 0)
        if not ready:
            return False
        data = self._recv()
        if not data:
            self.outcome = "disconnected"
            return True
        events = self._reader.feed(data)
        return any(kind == "interrupt" for kind, _ in events)

    def _after(self, outcomes: List[Tuple[int, object]]) -> Optional[bytes]:
        """The stop reply for the first thing that stopped a vCPU."""
        ordered = sorted(outcomes, key=lambda o: isinstance(o[1], exits.Stopped))
        index, exit = ordered[0]
        if isinstance(exit, BaseException):
            log.error("vCPU %d: %s", index, exit)
            self.outcome = "ended"
            return b"X%02x" % SIGABRT
        if isinstance(exit, exits.Debug):
            self._current["g"] = self._current["c"] = index
            extra = b""
            if exit.watchpoint is not None:
                extra = b"watch:%x;" % exit.watchpoint
            elif exit.breakpoint is not None:
                point = self.vm.breakpoints.get(exit.breakpoint)
                extra = b"swbreak:;" if point is None or point.kind == "sw" else b"hwbreak:;"
            self._last_stop = self._stop_reply(SIGTRAP, index, extra)
            return self._last_stop
        if isinstance(exit, exits.Stopped):
            self._last_stop = self._stop_reply(SIGINT, index)
            return self._last_stop
        return self._ended(index, exit)

    def _stop_reply(self, signal: int, index: int, extra: bytes = b"") -> bytes:
        return b"T%02xthread:%x;%s" % (signal, index + 1, extra)

    def _ended(self, index: int, exit) -> bytes:
        """The guest ended: W with the status pyvt would exit with, or X
        with a signal for a failure."""
        self.final_exit = exit
        self.outcome = "ended"
        log.info("vCPU %d: the guest ended: %s", index,
                 exit.describe() if getattr(exit, "failed", False) else repr(exit))
        status = ending_status(exit)
        if status is None:
            return b"X%02x" % (SIGSEGV if getattr(exit, "failed", False) else SIGABRT)
        return b"W%02x" % status

    def _detach(self, rest: bytes) -> bytes:
        self._clear_points()
        self.outcome = "detached"
        return b"OK"

    def _kill(self, rest: bytes) -> Optional[bytes]:
        self.outcome = "killed"
        return None


def ending_status(exit) -> Optional[int]:
    """The exit status a guest that ended normally reports (W packet): a
    debug-exit's status, 0 for hlt, a reset or a shutdown; None for the rest
    (failures, I/O nobody handles), which gdb gets as a signal."""
    if isinstance(exit, exits.DebugExit):
        return exit.status
    if isinstance(exit, (exits.Hlt, exits.Reset, exits.SystemEvent)):
        return 0
    return None


__all__ = ["GdbServer", "run_under_gdb", "PacketReader", "checksum", "escape", "unescape", "frame",
           "parse_address", "ending_status", "REGISTERS", "TARGET_XML"]


def run_under_gdb(vm, address, run_on: Callable[[], exits.AnyExit]) -> exits.AnyExit:
    """What ``pyvt run/boot --gdb`` does: serves gdb on ``address`` with the
    VM stopped before its first instruction, and returns how the guest
    ended.  If gdb detaches (or goes away), the guest runs on without it
    (``run_on()``); if gdb kills it, the exit is :class:`pyvt.exits.Stopped`."""
    server = GdbServer(vm, address)
    log.warning("waiting for gdb on %s:%d (target remote %s:%d)", *server.address,
                *server.address)
    server.serve()
    if server.outcome == "ended" and server.final_exit is not None:
        return server.final_exit
    if server.outcome == "killed":
        cpu = vm.vcpus[min(vm.vcpus)]
        return exits.Stopped(cpu.regs.rip)
    log.warning("gdb %s: the guest runs on", server.outcome)
    return run_on()
