"""``pyvt ctl PATH COMMAND [KEY=VALUE...]``: one command to a VM's control
socket (:mod:`pyvt.control`), its reply printed as JSON.

Arguments are ``KEY=VALUE``; a VALUE that parses as JSON (``5``, ``true``,
``"x"``, ``[1]``) is taken as such, any other as a string.  ``migrate`` takes
its ``uri`` and ``snapshot`` its ``path`` as a plain first argument too:
``pyvt ctl vm.sock migrate tcp:HOST:PORT downtime_ms=50``.

``migrate`` waits for the migration's end (the socket's MIGRATION events,
and ``query-migrate`` while none comes) and prints one JSON object:
``status`` ("completed", "failed" or "cancelled"), ``downtime_ms``,
``total_ms``, ``transferred_bytes``, ``rounds``...

Exit status: 0 on success (for ``migrate``: only if it completed), 1 on an
error reply (or a VM that went away before replying), 2 on a usage error
(bad arguments, no socket at PATH, cannot connect), with a ``pyvt:`` line
on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import stat
import sys
import time
from typing import Any, Dict, List, Optional

EXIT_OK = 0
EXIT_ERROR_REPLY = 1
EXIT_USAGE = 2

#: Commands whose first plain argument is this one's value.
POSITIONAL = {"migrate": "uri", "snapshot": "path"}
#: How often ``migrate`` asks how the migration goes when no event came (s).
POLL_INTERVAL = 0.5
TERMINAL = ("completed", "failed", "cancelled")

_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*\Z")


class UsageError(Exception):
    """A usage error: ``pyvt ctl`` exits 2 with this message."""


class Disconnected(Exception):
    """The VM closed the connection."""


def parse_arguments(command: str, items: List[str]) -> Dict[str, Any]:
    """``KEY=VALUE`` items (and ``command``'s plain first argument) -> the
    request's arguments."""
    arguments: Dict[str, Any] = {}
    for position, item in enumerate(items):
        key, sep, value = item.partition("=")
        if sep and _KEY.match(key):
            if key in arguments:
                raise UsageError(f"argument {key} given twice")
            try:
                arguments[key] = json.loads(value)
            except ValueError:
                arguments[key] = value
            continue
        name = POSITIONAL.get(command)
        if name is None or position != 0:
            raise UsageError(f"cannot parse {item!r}: arguments are KEY=VALUE"
                             + (f" (or the {name} first)" if name else ""))
        arguments[name] = item
    return arguments


class Connection:
    """A line-oriented client of one control socket."""

    def __init__(self, path: str):
        try:
            mode = os.stat(path).st_mode
        except OSError as e:
            raise UsageError(f"no control socket at {path}: {e.strerror}") from None
        if not stat.S_ISSOCK(mode):
            raise UsageError(f"{path} is not a socket (pass the --control PATH of a running "
                             "pyvt run or pyvt boot)")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.connect(path)
        except OSError as e:
            self.sock.close()
            raise UsageError(f"cannot connect to the control socket {path}: {e.strerror}"
                             + (" (no VM serves it any more)"
                                if isinstance(e, ConnectionRefusedError) else "")) from None
        self._buffer = b""
        self.events: List[dict] = []

    def close(self) -> None:
        self.sock.close()

    def send(self, command: str, arguments: Optional[dict] = None) -> None:
        request: Dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        try:
            self.sock.sendall((json.dumps(request) + "\n").encode())
        except OSError:
            raise Disconnected() from None

    def receive(self, timeout: Optional[float] = None) -> Optional[dict]:
        """The next message, or None after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._buffer:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.sock.settimeout(left)
            else:
                self.sock.settimeout(None)
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                return None
            except OSError:
                raise Disconnected() from None
            if not data:
                raise Disconnected()
            self._buffer += data
        line, self._buffer = self._buffer.split(b"\n", 1)
        try:
            message = json.loads(line)
        except ValueError:
            raise Disconnected() from None  # not a pyvt control socket
        return message if isinstance(message, dict) else {}

    def call(self, command: str, arguments: Optional[dict] = None) -> dict:
        """Sends a request and returns its reply; events on the way are kept
        in ``events``."""
        self.send(command, arguments)
        while True:
            message = self.receive()
            if message is None:  # no timeout was given: cannot happen
                continue
            if "event" in message:
                self.events.append(message)
            else:
                return message


def _print(obj) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True), flush=True)


def migrate(connection: Connection, arguments: dict) -> int:
    """Starts the migration and waits for its end; prints its figures."""
    connection.call("subscribe")
    reply = connection.call("migrate", arguments)
    if "error" in reply:
        _print(reply)
        return EXIT_ERROR_REPLY
    info = reply.get("return") or {}
    migrated = False
    try:
        while info.get("status") not in TERMINAL:
            message = connection.receive(POLL_INTERVAL)
            events = connection.events + ([message] if message and "event" in message else [])
            connection.events = []
            for event in events:
                data = event.get("data") or {}
                if event.get("event") == "MIGRATION" and data.get("status") in TERMINAL:
                    info = data.get("info") or {**info, "status": data["status"]}
                elif event.get("event") == "SHUTDOWN" and data.get("exit") == "Migrated":
                    migrated = True
            if info.get("status") in TERMINAL:
                break
            if message is None:  # no news for a while: ask
                answer = connection.call("query-migrate")
                if "return" in answer:
                    info = answer["return"]
    except Disconnected:
        # The source VM ends once its migration completes: its socket goes too.
        info = {**info, "status": "completed" if migrated else "failed"}
        if not migrated:
            info.setdefault("error", "the VM closed its control socket before the "
                                     "migration ended")
    for key in ("status", "downtime_ms", "total_ms", "transferred_bytes", "rounds"):
        info.setdefault(key, None)
    _print(info)
    return EXIT_OK if info["status"] == "completed" else EXIT_ERROR_REPLY


def _parser() -> argparse.ArgumentParser:
    from .cli import _Parser

    parser = _Parser(prog="pyvt ctl", description=__doc__.split("\n\n")[0])
    parser.add_argument("path", help="the control socket (pyvt run|boot --control PATH)")
    parser.add_argument("command", help="query-status, query-stats, stop, cont, snapshot, "
                        "migrate, migrate-cancel, query-migrate, quit, query-commands")
    parser.add_argument("arguments", nargs="*", metavar="KEY=VALUE")
    return parser


def main(argv: List[str]) -> int:
    from .cli import _report

    args = _parser().parse_args(argv)
    try:
        arguments = parse_arguments(args.command, args.arguments)
        connection = Connection(args.path)
    except UsageError as e:
        _report(str(e))
        return EXIT_USAGE
    try:
        if args.command == "migrate":
            return migrate(connection, arguments)
        reply = connection.call(args.command, arguments)
    except Disconnected:
        _report(f"the VM at {args.path} closed the connection before replying")
        return EXIT_ERROR_REPLY
    finally:
        connection.close()
    _print(reply)
    return EXIT_ERROR_REPLY if "error" in reply else EXIT_OK


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
