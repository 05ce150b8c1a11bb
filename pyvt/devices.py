"""Python handles on the native devices every pyvt VM has.

The devices themselves are C (``csrc/uart16550.c``, ``debugcon.c``,
``debug_exit.c``) and run without Python on their path; these classes only
read their captured output, feed input and take them off the bus.
"""

from __future__ import annotations

import io
import os
import sys
from typing import Any

from .errors import ArgumentError



class Console:
    """A character device whose guest output pyvt captures.

    ``output`` is everything written so far (bytes); ``text`` the same
    decoded.  ``stream(sys.stdout)`` also copies output there as it comes.
    """

    def __init__(self, vm, native, name: str, port: int, coalesced: bool):
        self._vm = vm
        self._native = native
        self.name = name
        self.port = port
        #: True when KVM queues the data-register writes (coalesced PIO).
        self.coalesced = coalesced
        self._stream_target: Any = None

    def __repr__(self) -> str:
        state = "attached" if self.attached else "detached"
        return f"<Console {self.name} at {self.port:#x}, {state}, {len(self.output)} bytes>"

    @property
    def attached(self) -> bool:
        return bool(self._native.attached)

    @property
    def output(self) -> bytes:
        """All guest output so far."""
        self._vm._sync_devices()
        return self._native.output()

    @property
    def text(self) -> str:
        """``output`` decoded as UTF-8 (undecodable bytes replaced)."""
        return self.output.decode("utf-8", "replace")

    def clear(self) -> None:
        """Forgets the output captured so far."""
        self._vm._sync_devices()
        self._native.clear()

    def feed(self, data: bytes) -> int:
        """Queues input for the guest to read; returns how many bytes fit."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ArgumentError(f"console input must be bytes, not {type(data).__name__}")
        return self._native.feed(bytes(data))

    def stream(self, target: Any) -> None:
        """Copies guest output, as it comes, to ``target``: a file object,
        a file descriptor, ``"stdout"``/``"stderr"``, or None to stop."""
        if target is None:
            self._native.stream(-1)
            self._stream_target = None
            return
        if target == "stdout":
            target = sys.stdout
        elif target == "stderr":
            target = sys.stderr
        if isinstance(target, int) and not isinstance(target, bool):
            fd = target
        else:
            try:
                if hasattr(target, "flush"):
                    target.flush()
                fd = target.fileno()
            except (AttributeError, OSError, io.UnsupportedOperation):
                raise ArgumentError(
                    f"cannot stream to {target!r}: it needs a real file descriptor "
                    "(a file, a pipe, sys.stdout)") from None
        try:
            os.fstat(fd)
        except OSError:
            raise ArgumentError(f"cannot stream to fd {fd}: it is not open") from None
        self._stream_target = target  # keep the file object alive
        self._native.stream(fd)

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
