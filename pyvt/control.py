"""The control socket: ``vm.serve_control(path)``, ``pyvt run|boot --control PATH``.

A Unix stream socket (file mode 0600; a peer of another user is refused
even so, by its SO_PEERCRED) that speaks one JSON object per line, in the
manner of QEMU's QMP:

- a request is ``{"execute": NAME, "arguments": {...}}`` (``arguments``
  optional; an ``"id"`` of any JSON value is echoed in the reply);
- a reply is ``{"return": VALUE}`` or ``{"error": {"class": CLASS, "desc":
  TEXT}}``.  ``CLASS`` is ``ParseError`` (not JSON, not an object, or a
  line longer than :data:`MAX_LINE`), ``CommandNotFound``,
  ``InvalidArgument`` (a missing, unknown or ill-typed argument), or
  ``GenericError`` (the command failed: ``desc`` says why);
- events are ``{"event": NAME, "data": {...}, "timestamp": SECONDS}``.  A
  client receives them after it sends ``{"execute": "subscribe"}`` (and no
  more after ``unsubscribe``): a client that only asks questions never
  finds an event where it expects its reply.  Events: ``STOP``,
  ``RESUME``, ``SHUTDOWN``, ``MIGRATION``.

Commands: ``query-status``, ``query-stats``, ``stop``, ``cont``,
``snapshot`` (``path``), ``migrate`` (``uri``, ``downtime_ms``),
``migrate-cancel``, ``query-migrate``, ``quit``, ``subscribe``,
``unsubscribe``, ``query-commands``.  A bad request gets an error reply and
the connection stays open; clients are served concurrently, one thread each.

Each server registers its VM in the runtime directory (:func:`runtime_dir`:
``$XDG_RUNTIME_DIR/pyvt``, else ``/run/pyvt``) as ``<pid>-<n>.json``
(name, pid, socket, vCPUs, memory), where ``pyvt top`` finds it; the file
goes when the server closes, and entries of dead processes are ignored.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import socket
import stat
import struct
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional

from . import exits
from .errors import ArgumentError, ControlError, Error

#: The longest request line accepted (bytes); a longer one gets a ParseError.
MAX_LINE = 1 << 20
#: Clients served at once; more are told so and closed.
MAX_CLIENTS = 64
#: Seconds a send to a client may block before the client is dropped.
SEND_TIMEOUT = 5
#: Seconds close() waits for a migration under way to end (see close()).
MIGRATION_GRACE = 5.0

_serial = itertools.count()


def runtime_dir() -> str:
    """Where served VMs are registered: ``$XDG_RUNTIME_DIR/pyvt`` if that
    variable is set, else ``/run/pyvt``."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    return os.path.join(base, "pyvt") if base else "/run/pyvt"


class CommandError(Exception):
    """A command's failure, as its error reply says it."""

    def __init__(self, error_class: str, desc: str):
        super().__init__(desc)
        self.error_class = error_class
        self.desc = desc


def _arguments(args: Dict[str, Any], required: Optional[Dict[str, type]] = None,
               optional: Optional[Dict[str, type]] = None) -> Dict[str, Any]:
    """Checks a command's arguments: names and JSON types."""
    required = required or {}
    optional = optional or {}
    unknown = sorted(set(args) - set(required) - set(optional))
    if unknown:
        raise CommandError("InvalidArgument", f"unknown argument(s): {', '.join(unknown)}")
    for name, kind in {**required, **optional}.items():
        if name not in args:
            if name in required:
                raise CommandError("InvalidArgument", f"missing argument: {name}")
            continue
        value = args[name]
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
              if kind is float else isinstance(value, kind))
        if not ok:
            what = "a number" if kind is float else "a string" if kind is str else kind.__name__
            raise CommandError("InvalidArgument",
                               f"argument {name} must be {what}, not {json.dumps(value)}")
    return args


class _Client:
    """One connection: its socket, a write lock (replies and events come
    from different threads) and whether it wants events."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        # A client that stops reading must not block the thread that sends
        # it an event (a vCPU's, the one pausing): give up on it instead.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                        struct.pack("ll", int(SEND_TIMEOUT), 0))
        self.lock = threading.Lock()
        self.subscribed = False
        self.thread: Optional[threading.Thread] = None

    def send(self, message: dict) -> bool:
        data = (json.dumps(message, default=str) + "\n").encode()
        with self.lock:
            try:
                self.sock.sendall(data)
                return True
            except OSError:
                try:
                    self.sock.shutdown(socket.SHUT_RDWR)  # its reader thread ends
                except OSError:
                    pass
                return False


class ControlServer:
    """Serves one VM's control socket from a thread of its own (see the
    module's docstring).  Made by :meth:`pyvt.Vm.serve_control`; closed by
    :meth:`close` or with the VM."""

    def __init__(self, vm, path, name: Optional[str] = None):
        if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
            raise ArgumentError(f"a control socket path is a file name, not {path!r}")
        if name is not None and (not isinstance(name, str) or not name or "\n" in name):
            raise ArgumentError(f"a VM name is a non-empty one-line string, not {name!r}")
        self.vm = vm
        self.path = os.path.abspath(os.fspath(path))
        self.name = name or f"pyvt-{os.getpid()}"
        self.registration: Optional[str] = None
        self._closed = False
        self._lock = threading.Lock()
        # Commands that change the run state go one at a time.
        self._command_lock = threading.Lock()
        self._clients: List[_Client] = []
        self._listener = self._listen(self.path)
        try:
            self._inode = os.stat(self.path).st_ino
            self._unsubscribe = vm.subscribe(self._event)
        except BaseException:
            self._listener.close()
            raise
        self._commands: Dict[str, Callable[[_Client, dict], Any]] = {
            "query-status": self._query_status,
            "query-stats": self._query_stats,
            "stop": self._stop,
            "cont": self._cont,
            "snapshot": self._snapshot,
            "migrate": self._migrate,
            "migrate-cancel": self._migrate_cancel,
            "query-migrate": self._query_migrate,
            "quit": self._quit,
            "subscribe": self._subscribe,
            "unsubscribe": self._unsubscribe_client,
            "query-commands": self._query_commands,
        }
        self.registration = self._register()
        self._thread = threading.Thread(target=self._accept_loop, name="pyvt-control",
                                        daemon=True)
        self._thread.start()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "serving"
        return f"<ControlServer {self.name!r} on {self.path} ({state})>"

    @property
    def closed(self) -> bool:
        return self._closed

    # -- the socket ------------------------------------------------------------

    @staticmethod
    def _listen(path: str) -> socket.socket:
        if len(os.fsencode(path)) >= 108:  # sun_path
            raise ControlError(f"the control socket path {path} is too long for a Unix "
                               "socket (107 bytes at most): choose a shorter one")
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            mode = None
        except OSError as e:
            raise ControlError(f"cannot use {path} as a control socket: {e.strerror}") from None
        if mode is not None:
            if not stat.S_ISSOCK(mode):
                raise ControlError(f"{path} exists and is not a socket: pyvt will not replace "
                                   "it; choose another --control path")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
            except ConnectionRefusedError:
                os.unlink(path)  # a stale socket: nobody listens on it
            except OSError as e:
                raise ControlError(f"cannot check the socket {path}: {e.strerror}") from None
            else:
                raise ControlError(f"{path} is the live control socket of another process: "
                                   "choose another --control path")
            finally:
                probe.close()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(path)
            os.chmod(path, 0o600)  # only the owner may connect (peers are checked too)
            listener.listen(16)
        except OSError as e:
            listener.close()
            raise ControlError(f"cannot serve a control socket at {path}: {e.strerror}") from None
        return listener

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return  # closed
            client = _Client(sock)
            if not self._same_user(sock):
                client.send({"error": {"class": "GenericError",
                                       "desc": "permission denied: only the VM's owner may "
                                               "use its control socket"}})
                sock.close()
                continue
            with self._lock:
                if self._closed:
                    sock.close()
                    return
                if len(self._clients) >= MAX_CLIENTS:
                    client.send({"error": {"class": "GenericError",
                                           "desc": f"too many clients (at most {MAX_CLIENTS})"}})
                    sock.close()
                    continue
                self._clients.append(client)
            client.thread = threading.Thread(target=self._serve_client, args=(client,),
                                             name="pyvt-control-client", daemon=True)
            client.thread.start()

    @staticmethod
    def _same_user(sock: socket.socket) -> bool:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _, uid, _ = struct.unpack("3i", creds)
        return uid in (os.getuid(), 0)

    def _serve_client(self, client: _Client) -> None:
        buffer = b""
        discarding = False  # inside a line longer than MAX_LINE
        try:
            while not self._closed:
                try:
                    data = client.sock.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                buffer += data
                while True:
                    end = buffer.find(b"\n")
                    if end < 0:
                        if len(buffer) > MAX_LINE:
                            if not discarding:
                                client.send(_error("ParseError", f"request line longer than "
                                                   f"{MAX_LINE} bytes: ignored"))
                            discarding = True
                            buffer = b""
                        break
                    line, buffer = buffer[:end], buffer[end + 1:]
                    if discarding:
                        discarding = False  # the end of the oversized line
                        continue
                    if len(line) > MAX_LINE:
                        client.send(_error("ParseError", f"request line longer than "
                                           f"{MAX_LINE} bytes: ignored"))
                        continue
                    if line.strip():
                        reply, after = self._handle(client, line)
                        if not client.send(reply):
                            return
                        if after is not None:
                            after()
        finally:
            with self._lock:
                if client in self._clients:
                    self._clients.remove(client)
            try:
                client.sock.close()
            except OSError:
                pass

    # -- requests --------------------------------------------------------------

    def handle_line(self, line: bytes) -> dict:
        """Carries out one request line (as from a client that has not
        subscribed) and returns its reply."""
        reply, after = self._handle(None, line)
        if after is not None:
            after()
        return reply

    def _handle(self, client: Optional[_Client], line: bytes):
        """(the reply to one request line, what to do once it is sent or None)."""
        try:
            request = json.loads(line)
        except (ValueError, UnicodeDecodeError) as e:
            return _error("ParseError", f"not JSON: {e}"), None
        if not isinstance(request, dict):
            return _error("ParseError", "a request is a JSON object: "
                          '{"execute": NAME, "arguments": {...}}'), None
        reply = self._execute(client, request)
        after = None
        if isinstance(reply.get("return"), _Then):
            reply["return"], after = reply["return"].value, reply["return"].action
        if "id" in request:
            reply["id"] = request["id"]
        return reply, after

    def _execute(self, client, request: dict) -> dict:
        name = request.get("execute")
        if not isinstance(name, str):
            return _error("ParseError", 'a request names its command: {"execute": NAME}')
        unknown = sorted(set(request) - {"execute", "arguments", "id"})
        if unknown:
            return _error("ParseError", f"unknown request member(s): {', '.join(unknown)}")
        args = request.get("arguments", {})
        if not isinstance(args, dict):
            return _error("InvalidArgument", "arguments is a JSON object")
        command = self._commands.get(name)
        if command is None:
            return _error("CommandNotFound", f"unknown command {name!r}; the commands are: "
                          f"{', '.join(sorted(self._commands))}")
        try:
            return {"return": command(client, args)}
        except CommandError as e:
            return _error(e.error_class, e.desc)
        except Error as e:
            return _error("GenericError", f"{name}: {e}")
        except Exception as e:  # a bug must not take the connection down
            return _error("GenericError", f"{name} failed: {type(e).__name__}: {e}")

    def _query_status(self, client, args) -> dict:
        _arguments(args)
        status = self.vm.status
        return {"status": status, "running": status == "running", "name": self.name,
                "pid": os.getpid(), "vcpus": len(self.vm.vcpus),
                "memory": self.vm.memory.size}

    def _query_stats(self, client, args) -> dict:
        _arguments(args)
        vm = self.vm
        return {"time_ns": time.monotonic_ns(), "status": vm.status, "vm": vm.stats,
                "vcpus": [{"index": index, "stats": vm.vcpus[index].stats}
                          for index in sorted(vm.vcpus)]}

    def _stop(self, client, args) -> dict:
        _arguments(args)
        with self._command_lock:
            self.vm.pause()
        return {}

    def _cont(self, client, args) -> dict:
        _arguments(args)
        # The migration pauses the VM for its throttle and its stop-and-copy:
        # a cont then would let the guest write pages already sent.
        self._refuse_during_migration("cont after it ends")
        with self._command_lock:
            if self.vm.status not in ("paused", "running"):
                raise CommandError("GenericError", f"the VM is {self.vm.status}: only a "
                                   "paused VM continues")
            self.vm.resume()
        return {}

    def _refuse_during_migration(self, advice: str) -> None:
        migration = getattr(self.vm, "migration", None)
        if migration is not None and not getattr(migration, "done", True):
            raise CommandError("GenericError", f"a migration is under way: {advice} "
                               "(or migrate-cancel it)")

    def _snapshot(self, client, args) -> dict:
        path = _arguments(args, {"path": str})["path"]
        if not path:
            raise CommandError("InvalidArgument", "argument path must not be empty")
        self._refuse_during_migration("snapshot after it ends")
        with self._command_lock:
            was_paused = self.vm.status == "paused"
            self.vm.pause()  # a running VM is paused for the copy, as QEMU's savevm
            try:
                snap = self.vm.snapshot()
            finally:
                if not was_paused:
                    self.vm.resume()
        try:
            snap.save(path)
        finally:
            snap.close()
        return {"path": os.path.abspath(path), "bytes": os.path.getsize(path)}

    def _migrate(self, client, args) -> dict:
        args = _arguments(args, {"uri": str}, {"downtime_ms": float})
        start = getattr(self.vm, "start_migration", None)
        if start is None:
            raise CommandError("GenericError", "this pyvt has no live migration")
        with self._command_lock:
            migration = start(args["uri"], args.get("downtime_ms", 30))
        return migration.info()

    def _current_migration(self):
        migration = getattr(self.vm, "migration", None)
        if migration is None:
            raise CommandError("GenericError", "no migration has been started")
        return migration

    def _migrate_cancel(self, client, args) -> dict:
        _arguments(args)
        self._current_migration().cancel()
        return {}

    def _query_migrate(self, client, args) -> dict:
        _arguments(args)
        migration = getattr(self.vm, "migration", None)
        return {"status": "none"} if migration is None else migration.info()

    def _quit(self, client, args) -> "_Then":
        _arguments(args)
        # The reply goes first: the run's end may close the VM, and this
        # server with it, before a reply sent afterwards would leave.
        return _Then({}, self._end_run)

    def _end_run(self) -> None:
        with self._command_lock:
            if not self.vm.closed:
                self.vm.end_run(exits.Quit("control socket"))

    def _subscribe(self, client, args) -> dict:
        _arguments(args)
        if client is not None:
            client.subscribed = True
        return {"events": list(EVENTS)}

    def _unsubscribe_client(self, client, args) -> dict:
        _arguments(args)
        if client is not None:
            client.subscribed = False
        return {}

    def _query_commands(self, client, args) -> list:
        _arguments(args)
        return sorted(self._commands)

    # -- events ----------------------------------------------------------------

    def _event(self, name: str, data: dict) -> None:
        if name == "MIGRATION" and data.get("status") in ("completed", "failed", "cancelled"):
            # The final figures ride along: the source VM may be gone before
            # a client could ask query-migrate.
            migration = getattr(self.vm, "migration", None)
            if migration is not None and "info" not in data:
                try:
                    data["info"] = migration.info()
                except Exception:
                    pass
        message = {"event": name, "data": data, "timestamp": time.time()}
        with self._lock:
            clients = [c for c in self._clients if c.subscribed]
        for client in clients:
            client.send(message)

    # -- registration ------------------------------------------------------------

    def _register(self) -> Optional[str]:
        """Writes ``<pid>-<n>.json`` into the runtime directory; None (and a
        ``pyvt:`` line on stderr) if it cannot be written: the socket still
        works, ``pyvt top`` just does not see it."""
        directory = runtime_dir()
        entry = {"name": self.name, "pid": os.getpid(), "socket": self.path,
                 "vcpus": len(self.vm.vcpus), "memory": self.vm.memory.size,
                 "started": time.time()}
        path = os.path.join(directory, f"{os.getpid()}-{next(_serial)}.json")
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            temporary = path + ".tmp"
            with open(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600),
                      "w") as f:
                json.dump(entry, f)
            os.replace(temporary, path)
        except OSError as e:
            print(f"pyvt: cannot register the VM in {directory} ({e.strerror}): "
                  "pyvt top will not list it", file=sys.stderr, flush=True)
            return None
        return path

    # -- closing -------------------------------------------------------------------

    def close(self) -> None:
        """Stops serving: closes every connection, removes the socket file
        and the registration.  Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            clients = list(self._clients)
        self._let_migration_finish()
        self._unsubscribe()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        for client in clients:
            try:
                client.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        me = threading.current_thread()
        if self._thread is not me:
            self._thread.join(5)
        for client in clients:
            if client.thread is not None and client.thread is not me:
                client.thread.join(5)
        try:
            if os.stat(self.path).st_ino == self._inode:  # still ours
                os.unlink(self.path)
        except OSError:
            pass
        if self.registration is not None:
            try:
                os.unlink(self.registration)
            except OSError:
                pass
        servers = self.vm.__dict__.get("_control_servers")
        if servers is not None and self in servers:
            servers.remove(self)

    def _let_migration_finish(self) -> None:
        """A completed migration ends the source's run, and the VM is closed
        while its migration thread still says so: give it a moment
        (:data:`MIGRATION_GRACE`), so that subscribers hear how it ended."""
        migration = getattr(self.vm, "migration", None)
        if migration is None or getattr(migration, "done", True):
            return
        try:
            migration.wait(MIGRATION_GRACE)
        except Exception:
            pass

    def __enter__(self) -> "ControlServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


#: The events a subscriber may receive.
EVENTS = ("STOP", "RESUME", "SHUTDOWN", "MIGRATION")

class _Then:
    """A command's return ``value``, and ``action`` to take once the reply
    has been sent."""

    def __init__(self, value, action: Callable[[], None]):
        self.value = value
        self.action = action


def _error(error_class: str, desc: str) -> dict:
    return {"error": {"class": error_class, "desc": desc}}


def serve(vm, path, name: Optional[str] = None) -> ControlServer:
    """What :meth:`pyvt.Vm.serve_control` does."""
    from . import run_control

    vm._check_open()
    server = ControlServer(vm, path, name)
    run_control.of(vm).open_stats = True  # query-stats reads them while the VM runs
    vm.__dict__.setdefault("_control_servers", []).append(server)
    return server


def registered_vms(directory: Optional[str] = None) -> List[dict]:
    """The VMs registered in ``directory`` (default :func:`runtime_dir`)
    whose process is alive: each entry's dict plus ``"file"``.  Unreadable
    entries and those of dead processes are skipped."""
    directory = directory or runtime_dir()
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return []
    found = []
    for name in names:
        if not name.endswith(".json"):
            continue
        path = os.path.join(directory, name)
        try:
            with open(path) as f:
                entry = json.load(f)
            pid = int(entry["pid"])
            str(entry["socket"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if not _alive(pid):
            continue
        entry["file"] = path
        found.append(entry)
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's: alive
    except OSError as e:
        return e.errno != errno.ESRCH
    return True


__all__ = ["ControlServer", "serve", "runtime_dir", "registered_vms", "MAX_LINE", "EVENTS"]
