"""The ``pyvt`` command line (also ``python -m pyvt``).

    pyvt run FILE [--mode long] [--ring 0|3] [--at ADDR] [--timeout S] [--memory 16M]
                  [--gdb [HOST:]PORT] [--control PATH] [--name NAME]
                  (FILE: a flat binary, or assembly source ending in .S/.s)
    pyvt boot KERNEL [--smp N] [--memory 128M] [--append ARGS] [--initrd FILE]
                     [--disk FILE[,readonly] ...] [--net tap:NAME ...] [--rng]
                     [--console serial|virtio]
                     [--timeout S] [--no-irqchip] [--strict-io] [--trace-io] [--no-stdin]
                     [--gdb [HOST:]PORT] [--control PATH] [--name NAME]
                  (KERNEL: a Linux bzImage, multiboot or ELF; the console is
                  stdin/stdout (Linux: console=ttyS0), like qemu -kernel
                  -nographic, or with --console virtio a virtio console
                  (console=hvc0); a reset or a power-off ends it with status 0)
    pyvt incoming tcp:HOST:PORT [--control PATH] [--timeout S] [--wait S] [--no-stdin]
                  (receives a live-migrating VM and runs it like `boot`)
    pyvt caps [--json] [--probe] [--require FEATURE ...]
    pyvt ctl PATH COMMAND [KEY=VALUE...]   (see pyvt.ctl)
    pyvt top [--json] [--interval S]       (see pyvt.top)
    pyvt version

``run`` streams the guest's serial console to stdout and prints the final
exit to stderr.  Exit status: 0 after ``hlt``; a debug-exit's QEMU-style
status ``(code << 1) | 1``; 124 on timeout; 1 when the guest failed or
stopped on an I/O nobody handles; 2 for bad arguments, an unusable host or
input, or a stdout that ``version`` cannot write to.  An error is
a ``pyvt:`` line on stderr (the assembler's messages follow it when
assembling failed), never a traceback.  The guest's console output needs no
stdout: closed, or a pipe whose reader left, it is dropped and the guest
runs on.

Input is read only after its size is checked against guest RAM (FILE, the
kernel, the initrd: a larger one is refused, a pipe or a device is read no
further than that).  ``--gdb [HOST:]PORT`` starts the VM stopped before its
first instruction and waits for gdb there (localhost unless HOST is given);
the guest runs when gdb continues, and pyvt exits with the status the guest
would have had without it (1 if gdb kills it).  File names and ``--append`` may hold any bytes: the
guest gets them unchanged.  ``--control PATH`` serves the VM's control socket
(:mod:`pyvt.control`) while it runs; a ``quit`` on it exits 0, and so does a
completed live migration, naming where the VM went.
"""

from __future__ import annotations

import argparse
import fcntl
import math
import os
import sys
from typing import List, Optional

from . import __version__, boot_devices, exits
from .errors import ArgumentError, Error

EXIT_TIMEOUT = 124
EXIT_GUEST_FAILED = 1
EXIT_USAGE = 2


def _report(message: str) -> None:
    """Says ``message`` on stderr as one ``pyvt:`` line.  A stderr that
    cannot be written (a pipe whose reader has gone) does not turn it into
    a traceback: the exit status still tells."""
    try:
        print(f"pyvt: {message}", file=sys.stderr, flush=True)
    except OSError:
        pass


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line (status 2), as pyvt's
    other errors, instead of the whole usage text."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"pyvt: {message} (see '{self.prog} --help')\n")


def _address(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"an address must not be negative: {text!r}")
    return value


def _seconds(text: str) -> Optional[float]:
    """A --timeout: seconds, however many; ``inf`` is no limit (None)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if math.isnan(value):
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}")
    if value < 0:
        raise argparse.ArgumentTypeError(f"a timeout must not be negative: {text!r}")
    return None if math.isinf(value) else value


_TIMEOUT_HELP = "seconds before giving up (any number; inf: no limit, the default)"
_STATUSES = ("Exit status: the guest's isa-debug-exit status (code << 1) | 1, as QEMU gives "
             "it; 0 after hlt, a reset or a power-off; 124 on timeout; 1 when the guest failed or stopped "
             "on an I/O nobody handles; 2 for bad arguments or input.")

_GDB_HELP = ("wait for gdb (target remote [HOST:]PORT; HOST defaults to localhost) before "
             "the first instruction; the timeout then applies only after gdb detaches")


def _gdb_logging(address) -> None:
    """With --gdb, the stub's log (where it listens, fallbacks) goes to
    stderr as pyvt: lines."""
    if address is None:
        return
    import logging

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("pyvt: %(message)s"))
    for name in ("pyvt.gdbstub", "pyvt.debugging"):
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def _control_arguments(parser) -> None:
    parser.add_argument("--control", metavar="PATH", default=None,
                        help="serve the VM's control socket (JSON lines; see pyvt ctl) at PATH")
    parser.add_argument("--name", default=None,
                        help="the VM's name in pyvt top and query-status (default pyvt-PID)")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pyvt", description="Hardware virtualization from Python.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a flat binary in a minimal VM",
                         description=f"Runs FILE with the serial console on stdout.  {_STATUSES}")
    run.add_argument("file", help="flat binary (raw machine code), or UTF-8 assembly source "
                     "(.S/.s); refused if larger than the guest RAM above --at")
    run.add_argument("--mode", choices=["real", "protected", "long"], default="long")
    run.add_argument("--ring", type=int, choices=[0, 3], default=0,
                     help="privilege level (3: CPL 3, long mode; native on PVM hosts)")
    run.add_argument("--at", type=_address, default=None, help="load address (default 0x1000)")
    run.add_argument("--timeout", type=_seconds, default=None, help=_TIMEOUT_HELP)
    run.add_argument("--memory", default="16M", help="guest RAM (default 16M)")
    run.add_argument("--backend", default=None, help="device path (default: /dev/kvm)")
    run.add_argument("--gdb", metavar="[HOST:]PORT", default=None, help=_GDB_HELP)
    _control_arguments(run)

    boot = sub.add_parser("boot", help="boot a kernel (Linux bzImage, multiboot, ELF or flat) "
                          "like qemu -kernel",
                          description=f"Boots KERNEL with the serial console on stdout.  "
                          f"{_STATUSES}")
    boot.add_argument("kernel", help="Linux bzImage, multiboot or ELF kernel, or a flat binary "
                      "(no larger than guest RAM)")
    boot.add_argument("--smp", type=int, default=1, help="number of vCPUs (default 1)")
    boot.add_argument("--memory", default="128M", help="guest RAM (default 128M)")
    boot.add_argument("--append", default="", help="kernel command line, passed to the guest "
                      "byte for byte as given (any bytes, UTF-8 or not)")
    boot.add_argument("--initrd", default=None, help="initial ramdisk (Linux), or multiboot "
                      "module 0")
    boot.add_argument("--disk", action="append", default=[], type=boot_devices.disk_option,
                      metavar="FILE[,readonly]", help="virtio-blk disk on a raw image "
                      "(repeatable; the first is /dev/vda)")
    boot.add_argument("--net", action="append", default=[], type=boot_devices.net_option,
                      metavar="tap:NAME", help="virtio-net NIC on an existing tap device "
                      "(repeatable)")
    boot.add_argument("--rng", action="store_true", help="virtio-rng entropy device")
    boot.add_argument("--console", choices=boot_devices.CONSOLES, default="serial",
                      help="where the terminal's input goes: the UART (default; Linux: "
                      "console=ttyS0) or a virtio console (Linux: console=hvc0, the "
                      "virtio_console driver); the output of both goes to stdout.")
    boot.add_argument("--timeout", type=_seconds, default=None, help=_TIMEOUT_HELP)
    boot.add_argument("--no-irqchip", action="store_true",
                      help="no in-kernel LAPIC/IOAPIC/PIC/PIT (one vCPU only)")
    boot.add_argument("--strict-io", action="store_true",
                      help="stop at an access to an unclaimed port or address")
    boot.add_argument("--trace-io", action="store_true",
                      help="log accesses to unclaimed ports and addresses to stderr")
    boot.add_argument("--no-stdin", action="store_true",
                      help="do not pass standard input to the guest's console")
    boot.add_argument("--backend", default=None, help="device path (default: /dev/kvm)")
    boot.add_argument("--gdb", metavar="[HOST:]PORT", default=None, help=_GDB_HELP)
    _control_arguments(boot)

    from .migration import cli as migration_cli

    migration_cli.add_parser(sub, _seconds, _TIMEOUT_HELP, _STATUSES, _control_arguments)

    # `caps` has its own parser (pyvt.caps.cli); main() hands it the rest.
    sub.add_parser("caps", help="report what virtualization this host can do",
                   add_help=False)

    sub.add_parser("version", help="print pyvt's version")
    # `ctl` and `top` have their own parsers (pyvt.ctl, pyvt.top) too.
    sub.add_parser("ctl", help="send a command to a VM's control socket", add_help=False)
    sub.add_parser("top", help="live view of the pyvt VMs with control sockets",
                   add_help=False)
    return parser


def exit_status(exit: exits.AnyExit) -> int:
    """The process exit status ``pyvt run`` uses for a final exit."""
    if isinstance(exit, exits.Hlt):
        return 0
    if isinstance(exit, exits.DebugExit):
        return exit.status
    if isinstance(exit, exits.Timeout):
        return EXIT_TIMEOUT
    if isinstance(exit, exits.Reset):
        return 0  # as qemu -no-reboot
    if isinstance(exit, exits.PowerOff):
        return 0
    if isinstance(exit, exits.Quit):
        return 0  # as QEMU's quit
    migrated = getattr(exits, "Migrated", None)  # pyvt.migration's
    if migrated is not None and isinstance(exit, migrated):
        return 0  # the VM runs on elsewhere
    return EXIT_GUEST_FAILED


def _assemble_source(path: str, at: int, limit: int) -> bytes:
    from .assemble import assemble_source_bytes
    from .loaders.common import read_image_file

    raw = read_image_file(path, "assembly source", limit)
    return assemble_source_bytes(raw, path, at)


def _run(args) -> int:
    from .loaders.common import read_image_file
    from .memory import parse_size
    from .runner import LOAD_ADDRESS, run

    at = LOAD_ADDRESS if args.at is None else args.at
    room = parse_size(args.memory) - at  # what the code may take up, checked before reading
    if room <= 0:
        raise ArgumentError(f"--at {at:#x} is beyond the guest's {args.memory} of RAM")
    if args.file.endswith((".S", ".s")):
        code = _assemble_source(args.file, at, room)
    else:
        code = read_image_file(args.file, "guest code", room)
    if not code:
        _report(f"{args.file} is empty")
        return EXIT_USAGE
    _gdb_logging(args.gdb)
    result = run(code, mode=args.mode, memory=args.memory, timeout=args.timeout,
                 at=at, backend=args.backend, stream=sys.stdout, ring=args.ring, gdb=args.gdb,
                 control=args.control, name=args.name)
    sys.stdout.flush()
    exit = result.exit
    _report(exit.describe() if exit.failed else repr(exit))
    return exit_status(exit)


def _feed_stdin(console, fd: int = 0) -> None:
    """Passes what arrives on ``fd`` to the guest's UART, as qemu -serial
    stdio does (a daemon thread: it ends with the process)."""
    import threading
    import time

    def pump():
        while True:
            try:
                data = os.read(fd, 4096)
            except OSError:
                return
            if not data:
                return
            while data:
                taken = console.feed(data)
                data = data[taken:]
                if data:
                    time.sleep(0.01)  # the receive FIFO is full: let the guest read

    threading.Thread(target=pump, name="pyvt-stdin", daemon=True).start()


def _boot(args) -> int:
    from .vm import Vm

    if args.smp < 1:
        _report(f"--smp must be at least 1, not {args.smp}")
        return EXIT_USAGE
    boot_devices.check_disks(args.disk)
    boot_devices.check_taps(args.net)
    with Vm(args.memory, args.backend) as vm:
        vm.console.stream(sys.stdout)
        vm.debugcon.stream(sys.stdout)
        if not args.no_stdin and args.console == "serial":
            _feed_stdin(vm.console)
        # guest_string() gives the guest argv's original bytes (PEP 383).
        vm.boot(args.kernel, cmdline=args.append, initrd=args.initrd, smp=args.smp,
                irqchip=not args.no_irqchip, strict_io=args.strict_io)
        boot_devices.attach(vm, args.disk, args.net, args.rng, args.console, not args.no_stdin)
        trace_io = sys.stderr if args.trace_io else None
        if args.control is not None:
            vm.serve_control(args.control, args.name)
        if args.gdb is not None:
            from .gdbstub import run_under_gdb

            _gdb_logging(args.gdb)
            exit = run_under_gdb(vm, args.gdb, lambda: vm.run(args.timeout, trace_io))
        else:
            exit = vm.run(timeout=args.timeout, trace_io=trace_io)
        sys.stdout.flush()
    _report(exit.describe() if exit.failed else repr(exit))
    return exit_status(exit)


def _caps(argv: List[str]) -> int:
    from .caps.cli import main as caps_main

    return caps_main(argv)


def _open_standard_streams() -> None:
    """Points a closed stdin, stdout or stderr, or one open the wrong way
    (a stderr open only for reading), at /dev/null.

    Otherwise the next file opened (/dev/kvm, guest RAM, the assembler's
    files) takes a closed one's number, and what was meant for stdout lands
    there; and Python, which found it closed, left ``sys.stdout`` None."""
    for fd, name, access in ((0, "stdin", os.O_RDONLY), (1, "stdout", os.O_WRONLY),
                             (2, "stderr", os.O_WRONLY)):
        try:
            usable = (fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE) in (access, os.O_RDWR)
        except OSError:
            usable = False
        if not usable:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
        if getattr(sys, name) is None:
            setattr(sys, name, open(fd, "r" if fd == 0 else "w", closefd=False))


def _drop_stdout() -> None:
    """After a broken pipe: sends what stdout still buffers to /dev/null, so
    that flushing it at exit does not fail again."""
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, sys.stdout.fileno())
    os.close(null)


def _command(argv: List[str]) -> int:
    if argv[:1] == ["caps"]:
        return _caps(argv[1:])
    if argv[:1] == ["ctl"]:
        from .ctl import main as ctl_main

        return ctl_main(argv[1:])
    if argv[:1] == ["top"]:
        from .top import main as top_main

        return top_main(argv[1:])
    args = _parser().parse_args(argv)
    if args.command == "version":
        print(f"pyvt {__version__}")
        return 0
    if args.name is not None and args.control is None:
        _report("--name names the VM on its control socket: give --control PATH too")
        return EXIT_USAGE
    if args.command == "boot":
        return _boot(args)
    if args.command == "incoming":
        from .migration import cli as migration_cli

        return migration_cli.run(args, _report, _feed_stdin, exit_status)
    return _run(args)


def main(argv: Optional[List[str]] = None) -> int:
    _open_standard_streams()
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        status = _command(argv)
        sys.stdout.flush()  # here, where a broken pipe can still be reported
        return status
    except Error as e:
        _report(str(e))
        return EXIT_USAGE
    except BrokenPipeError:
        _drop_stdout()
        _report("cannot write the output: its pipe's reader has gone")
        return EXIT_USAGE
    except KeyboardInterrupt:
        _report("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
