"""Python handles on the native devices every pyvt VM has.

The devices themselves are C (``csrc/uart16550.c``, ``debugcon.c``,
``debug_exit.c``) and run without Python on their path; these classes only
read their captured output, feed input and take them off the bus.
"""

from __future__ import annotations

import errno
import io
import sys
from typing import Any, Optional

from . import _native
from .errors import ArgumentError, Error, KvmError


#: How much output a console keeps by default: its last MiB.
DEFAULT_OUTPUT_LIMIT: int = _native.DEFAULT_OUTPUT_LIMIT


def check_output_limit(limit: Optional[int]) -> Optional[int]:
    """``limit`` if it is a usable output limit: bytes (0 or more) or None."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)
                              or limit < 0):
        raise ArgumentError(f"an output limit is a number of bytes (0 or more) or None "
                            f"for no limit, not {limit!r}")
    return limit


class Console:
    """A character device whose guest output pyvt captures.

    ``output`` is the last ``limit`` bytes the guest wrote (1 MiB unless
    ``Vm(output_limit=...)`` or ``console.limit = ...`` says otherwise; None
    keeps everything), ``text`` the same decoded, ``dropped`` how many
    older bytes the limit let go.  ``stream(sys.stdout)`` also writes every
    byte there as it comes, whatever the limit.
    """

    def __init__(self, vm, native, name: str, port: int, coalesced: bool,
                 limit: Optional[int] = DEFAULT_OUTPUT_LIMIT):
        self._vm = vm
        self._native = native
        self.name = name
        self.port = port
        #: True when KVM queues the data-register writes (coalesced PIO).
        self.coalesced = coalesced
        if limit != DEFAULT_OUTPUT_LIMIT:  # the sink starts with the default
            self.limit = limit

    def __repr__(self) -> str:
        state = "attached" if self.attached else "detached"
        dropped = f", {self.dropped} dropped" if self.dropped else ""
        return (f"<Console {self.name} at {self.port:#x}, {state}, "
                f"{len(self.output)} bytes{dropped}>")

    @property
    def attached(self) -> bool:
        return bool(self._native.attached)

    @property
    def output(self) -> bytes:
        """The guest's output since the last :meth:`clear`: all of it, or
        its last ``limit`` bytes once there was more (see ``dropped``)."""
        self._vm._sync_devices()
        return self._native.output()

    @property
    def text(self) -> str:
        """``output`` decoded as UTF-8 (undecodable bytes replaced)."""
        return self.output.decode("utf-8", "replace")

    @property
    def limit(self) -> Optional[int]:
        """The most bytes of output kept (older ones are dropped), or None to
        keep everything.  Setting it keeps the last ``limit`` bytes there are."""
        return self._native.limit

    @limit.setter
    def limit(self, limit: Optional[int]) -> None:
        self._vm._sync_devices()
        if self._native.set_limit(check_output_limit(limit)):
            raise Error(f"cannot keep {limit} bytes of {self.name} output: out of memory")

    @property
    def dropped(self) -> int:
        """How many bytes the guest wrote since the last :meth:`clear` that
        ``output`` no longer holds because of ``limit`` (0: nothing was cut)."""
        self._vm._sync_devices()
        return self._native.dropped

    def clear(self) -> None:
        """Forgets the output captured so far (and frees its memory), and
        resets ``dropped``."""
        self._vm._sync_devices()
        self._native.clear()

    def feed(self, data: bytes) -> int:
        """Queues input for the guest to read; returns how many bytes fit."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ArgumentError(f"console input must be bytes, not {type(data).__name__}")
        return self._native.feed(bytes(data))

    def stream(self, target: Any) -> None:
        """Writes every byte of guest output from now on, as it comes and in
        order, to ``target``: a file object, a file descriptor,
        ``"stdout"``/``"stderr"``, or None to stop.

        pyvt writes to its own duplicate of the descriptor: closing
        ``target`` does not stop the stream (call ``stream(None)``), and no
        file opened later under its number ever receives guest output.  The
        duplicate is closed when the stream stops, moves to another target,
        or the VM is closed (a pipe's reader sees EOF only then).  If a write
        fails (a closed pipe), streaming stops and the guest runs on.
        """
        if target is None:
            self._native.stream(-1)
            return
        self._vm._check_open()
        if target == "stdout":
            target = sys.stdout
        elif target == "stderr":
            target = sys.stderr
        if isinstance(target, int) and not isinstance(target, bool):
            fd = target
        else:
            try:
                if hasattr(target, "flush"):
                    target.flush()  # what Python wrote there comes first
                fd = target.fileno()
            except (AttributeError, ValueError, OSError, io.UnsupportedOperation):
                raise ArgumentError(
                    f"cannot stream to {target!r}: it needs an open file descriptor "
                    "(a file, a pipe, sys.stdout)") from None
        rc = self._native.stream(fd) if 0 <= fd < 2**31 else -errno.EBADF
        if rc == -errno.EBADF:
            raise ArgumentError(f"cannot stream to fd {fd}: it is not open")
        if rc:
            raise KvmError(f"duplicate fd {fd} for the {self.name} stream (F_DUPFD_CLOEXEC)",
                           -rc, "close some files")

    def detach(self) -> None:
        """Takes the device off its port so the port can get a Python handler."""
        self._vm._detach_device(self)


class DebugExitDevice:
    """QEMU's isa-debug-exit: a guest write of v stops ``run()`` with
    ``exits.DebugExit(code=v)``, whose ``status`` is ``(v << 1) | 1``."""

    def __init__(self, vm, native, port: int):
        self._vm = vm
        self._native = native
        self.port = port
        self.name = "debug-exit"

    @property
    def attached(self) -> bool:
        return bool(self._native.attached)

    def __repr__(self) -> str:
        return f"<DebugExitDevice at {self.port:#x}>"

    def detach(self) -> None:
        """Takes the device off its port."""
        self._vm._detach_device(self)
