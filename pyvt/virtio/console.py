"""virtio-console (virtio 1.x section 5.3), port 0 only: Linux's hvc0.
Served by pyvt._virtio's ConsoleWorker, between host file descriptors."""

from __future__ import annotations

import io
import os
import struct
import sys
from ..errors import ArgumentTypeError
from .constants import TYPE_CONSOLE
from .native import NativeVirtioDevice, native_module


def _fd(stream, what: str) -> int:
    if isinstance(stream, int) and not isinstance(stream, bool):
        return stream
    try:
        return stream.fileno()
    except (AttributeError, io.UnsupportedOperation, ValueError):
        raise ArgumentTypeError(f"the console's {what} must be a file descriptor or a file "
                                f"with a fileno(), not {stream!r}") from None


class ConsoleDevice(NativeVirtioDevice):
    """A virtio console whose port 0 (hvc0 in Linux) reads the guest's input
    from ``input`` and writes its output to ``output`` (file descriptors
    or files with ``fileno()``; None: the host's stdin, stdout).  The
    descriptors are duplicated: the caller may close its own."""

    device_type = TYPE_CONSOLE
    worker_class = "ConsoleWorker"
    queue_sizes = (64, 64)  # receiveq0, transmitq0

    def __init__(self, input=None, output=None):
        super().__init__()
        in_fd = _fd(sys.stdin if input is None else input, "input")
        out_fd = _fd(sys.stdout if output is None else output, "output")
        self.in_fd = self.own(os.dup(in_fd))
        self.out_fd = self.own(os.dup(out_fd))

    def config(self) -> bytes:
        # struct virtio_console_config: cols, rows, max_nr_ports, emerg_wr
        return struct.pack("<HHII", 0, 0, 1, 0)

    def make_worker(self, memory):
        return native_module().ConsoleWorker(memory, self.in_fd, self.out_fd)

    def __repr__(self) -> str:
        return f"ConsoleDevice(input={self.in_fd}, output={self.out_fd})"
