"""The receiving side of a live migration: ``pyvt.Vm.incoming(uri)``.

A :class:`Listener` binds ``uri`` at once (so a caller knows where it
listens before the source connects: ``listener.uri`` has the real port for
``tcp:HOST:0``); :meth:`Listener.accept` takes one connection and receives
one VM (see :mod:`pyvt.migration.stream` for the chunks).  It builds the
machine from ``SETUP``, lets ``setup(vm)`` register the Python handlers
and state hooks the source had, writes the pages straight into guest memory,
checks and loads the state, answers ``ACK`` and waits for ``COMMIT``.
Anything else (a bad checksum, a chunk out of order, a closed connection,
state it cannot load, CPUID features this host lacks) closes the VM and
raises :class:`pyvt.MigrationError` after telling the source (``ERROR``):
it never returns a VM it did not wholly receive.
"""

from __future__ import annotations

import os
import socket
import stat
from typing import Callable, Optional

from .. import cpu_features, snapshot, state_hooks
from ..errors import Error, MigrationError
from . import machine, state, stream
from .stream import END, HOOKS, PAGES, ROUND, STATE

#: How long the destination waits for the source between chunks, and for
#: COMMIT: seconds.
PEER_TIMEOUT = 60.0


class Listener:
    """Listens on ``uri`` (``tcp:HOST:PORT``, port 0 for any; ``unix:PATH``)."""

    def __init__(self, uri: str):
        family, address = stream.parse_uri(uri)
        self._path = address if family == socket.AF_UNIX else None
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            if family != socket.AF_UNIX:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            elif os.path.exists(address) and stat.S_ISSOCK(os.stat(address).st_mode):
                os.unlink(address)  # a stale socket of an earlier listener
            self.sock.bind(address)
            self.sock.listen(1)
        except OSError as e:
            self.sock.close()
            raise MigrationError(f"cannot listen on {uri}: {e.strerror or e}") from None
        if family == socket.AF_UNIX:
            self.uri = f"unix:{address}"
        else:
            host, port = self.sock.getsockname()[:2]
            self.uri = f"tcp:[{host}]:{port}" if ":" in host else f"tcp:{host}:{port}"

    def accept(self, setup: Optional[Callable] = None, backend=None, vm_class=None,
               timeout: Optional[float] = None):
        """Waits (``timeout`` seconds at most) for one source and returns its
        VM, ready for ``vm.run()``; then stops listening."""
        if vm_class is None:
            from ..vm import Vm as vm_class
        self.sock.settimeout(timeout)
        try:
            conn, peer = self.sock.accept()
        except socket.timeout:
            raise MigrationError(f"no VM arrived on {self.uri} in {timeout} s") from None
        except OSError as e:
            raise MigrationError(f"cannot accept on {self.uri}: {e.strerror or e}") from None
        finally:
            self.close()
        name = peer if isinstance(peer, str) and peer else (
            f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "the source")
        return receive(stream.Channel(conn, f"the source {name}".strip()), setup, backend,
                       vm_class)

    def close(self) -> None:
        self.sock.close()
        if self._path is not None:
            try:
                os.unlink(self._path)
            except OSError:
                pass

    def __enter__(self) -> "Listener":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _region_view(vm, gpa: int, length: int) -> memoryview:
    """The guest memory a PAGES chunk fills, bounds-checked."""
    if gpa % 4096 or length % 4096 or not length:
        raise MigrationError(f"a PAGES chunk at {gpa:#x} of {length} bytes is not whole pages")
    for region in vm.memory.regions:
        if region.gpa <= gpa and gpa + length <= region.end:
            offset = gpa - region.gpa
            return memoryview(region.buffer)[offset:offset + length]
    raise MigrationError(f"a PAGES chunk at {gpa:#x} of {length} bytes lies outside "
                         "the VM's memory")


def receive(channel: stream.Channel, setup, backend, vm_class):
    """Receives one VM over ``channel``; see the module docstring."""
    vm = None
    try:
        channel.settimeout(PEER_TIMEOUT)
        channel.expect_preamble()
        channel.send_preamble()
        _, _, payload = channel.recv(stream.SETUP)
        description = machine.parse(payload)
        vm = machine.build(description, vm_class, backend)
        # The CPUID check probes this host's KVM once (a throwaway VM):
        # here, not in the downtime when the state arrives.
        cpu_features._host_features(vm.kvm)
        if setup is not None:
            setup(vm)
        machine.check_matches(vm, description)
        channel.send(stream.READY)
        snap = hooks = None
        chunks = 0
        try:
            while True:
                kind, crc, arg, length = channel.recv_head()
                if kind == PAGES and snap is None:
                    view = _region_view(vm, arg, length)
                    try:
                        channel.recv_into(view)
                        channel.check(kind, crc, arg, view)
                    finally:
                        view.release()
                    chunks += 1
                    continue
                payload = channel.recv_exact(length)
                channel.check(kind, crc, arg, payload)
                wanted = (PAGES, ROUND, STATE) if snap is None else (
                    (HOOKS,) if hooks is None else (END,))
                channel.accept(kind, arg, payload, wanted)
                if kind == STATE:
                    snap = state.decode(payload, backend)
                elif kind == HOOKS:
                    hooks = state.decode_hooks(payload)
                elif kind == END:
                    if arg != chunks:
                        raise MigrationError(f"the source sent {arg} PAGES chunks, "
                                             f"{chunks} arrived")
                    break
            _load(vm, snap, hooks)
        finally:
            if snap is not None:
                snap.close()
        channel.send(stream.ACK)
        channel.recv(stream.COMMIT)
        try:
            channel.send(stream.RUNNING)
        except MigrationError:
            pass  # the VM is ours: the source committed
        return vm
    except BaseException as e:
        message = str(e) if isinstance(e, Error) else f"{type(e).__name__}: {e}"
        channel.send_error(f"the destination refused the VM: {message}")
        channel.linger_close()
        if vm is not None:
            vm.close()
        if isinstance(e, MigrationError):
            raise
        if isinstance(e, Error):
            raise MigrationError(f"the incoming VM was refused: {e}") from e
        raise
    finally:
        channel.close()


def _load(vm, snap, hooks) -> None:
    """Puts the received state into the VM built from SETUP."""
    try:
        snapshot._check_same_shape(vm, snap)
        for saved in snap.vcpus:
            vm.vcpus[saved.index].fd.set_cpuid2_table(saved.cpuid)
        snapshot._restore_state(vm, snap, hooks=False)
        state_hooks.load_all(vm, hooks)
    except MigrationError:
        raise
    except Error as e:
        raise MigrationError(f"the VM's state cannot be loaded here: {e}") from None
