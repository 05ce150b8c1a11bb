"""The ``pyvt`` command line (also ``python -m pyvt``).

    pyvt run FILE [--mode long] [--at ADDR] [--timeout S] [--memory 16M]
                  (FILE: a flat binary, or assembly source ending in .S/.s)
    pyvt boot KERNEL [--smp N] [--memory 128M] [--append ARGS] [--initrd FILE]
                     [--timeout S] [--no-irqchip] [--strict-io] [--trace-io] [--no-stdin]
                  (KERNEL: multiboot or ELF; the console is stdin/stdout, like
                  qemu -kernel -nographic; a reset ends it with status 0)
    pyvt caps [--json] [--probe] [--require FEATURE ...]
    pyvt version

``run`` streams the guest's serial console to stdout and prints the final
exit to stderr.  Exit status: 0 after ``hlt``; a debug-exit's QEMU-style
status ``(code << 1) | 1``; 124 on timeout; 1 when the guest failed or
stopped on an I/O nobody handles; 2 for bad arguments or an unusable host.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from . import __version__, exits
from .errors import Error

EXIT_TIMEOUT = 124
EXIT_GUEST_FAILED = 1
EXIT_USAGE = 2


def _int(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("timeout must not be negative")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyvt", description="Hardware virtualization from Python.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a flat binary in a minimal VM")
    run.add_argument("file", help="flat binary (raw machine code), or assembly source (.S/.s)")
    run.add_argument("--mode", choices=["real", "protected", "long"], default="long")
    run.add_argument("--at", type=_int, default=None, help="load address (default 0x1000)")
    run.add_argument("--timeout", type=_seconds, default=None, help="seconds before giving up")
    run.add_argument("--memory", default="16M", help="guest RAM (default 16M)")
    run.add_argument("--backend", default=None, help="device path (default: /dev/kvm)")

    boot = sub.add_parser(
        "boot", help="boot a kernel (multiboot, ELF or flat) like qemu -kernel",
        description="Boots KERNEL with the serial console on stdout.  Exit status: the "
        "guest's isa-debug-exit status (code << 1) | 1 as QEMU gives it; 0 after a reset "
        "or hlt; 124 on timeout; 1 when the guest failed; 2 for bad arguments.")
    boot.add_argument("kernel", help="multiboot or ELF kernel, or a flat binary")
    boot.add_argument("--smp", type=int, default=1, help="number of vCPUs (default 1)")
    boot.add_argument("--memory", default="128M", help="guest RAM (default 128M)")
    boot.add_argument("--append", default="", help="kernel command line")
    boot.add_argument("--initrd", default=None, help="file passed as multiboot module 0")
    boot.add_argument("--timeout", type=_seconds, default=None, help="seconds before giving up")
    boot.add_argument("--no-irqchip", action="store_true",
                      help="no in-kernel LAPIC/IOAPIC/PIC/PIT (one vCPU only)")
    boot.add_argument("--strict-io", action="store_true",
                      help="stop at an access to an unclaimed port or address")
    boot.add_argument("--trace-io", action="store_true",
                      help="log accesses to unclaimed ports and addresses to stderr")
    boot.add_argument("--no-stdin", action="store_true",
                      help="do not pass standard input to the serial port")
    boot.add_argument("--backend", default=None, help="device path (default: /dev/kvm)")

    # `caps` has its own parser (pyvt.caps.cli); main() hands it the rest.
    sub.add_parser("caps", help="report what virtualization this host can do",
                   add_help=False)

    sub.add_parser("version", help="print pyvt's version")
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
    return EXIT_GUEST_FAILED


def _run(args) -> int:
    from .assemble import assemble_file
    from .runner import LOAD_ADDRESS, run

    at = LOAD_ADDRESS if args.at is None else args.at
    try:
        if args.file.endswith((".S", ".s")):
            code = assemble_file(args.file, at=at)
        else:
            with open(args.file, "rb") as f:
                code = f.read()
    except OSError as e:
        print(f"pyvt: cannot read {args.file}: {e.strerror}", file=sys.stderr)
        return EXIT_USAGE
    if not code:
        print(f"pyvt: {args.file} is empty", file=sys.stderr)
        return EXIT_USAGE
    result = run(code, mode=args.mode, memory=args.memory, timeout=args.timeout,
                 at=at, backend=args.backend,
                 stream=sys.stdout)
    sys.stdout.flush()
    exit = result.exit
    print(f"pyvt: {exit.describe() if exit.failed else repr(exit)}", file=sys.stderr)
    return exit_status(exit)


def _feed_stdin(console, fd: int = 0) -> None:
    """Passes what arrives on ``fd`` to the guest's UART, as qemu -serial
    stdio does (a daemon thread: it ends with the process)."""
    import os
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
        print(f"pyvt: --smp must be at least 1, not {args.smp}", file=sys.stderr)
        return EXIT_USAGE
    with Vm(args.memory, args.backend) as vm:
        vm.console.stream(sys.stdout)
        vm.debugcon.stream(sys.stdout)
        if not args.no_stdin:
            _feed_stdin(vm.console)
        vm.boot(args.kernel, cmdline=args.append, initrd=args.initrd, smp=args.smp,
                irqchip=not args.no_irqchip, strict_io=args.strict_io)
        exit = vm.run(timeout=args.timeout, trace_io=sys.stderr if args.trace_io else None)
        sys.stdout.flush()
    print(f"pyvt: {exit.describe() if exit.failed else repr(exit)}", file=sys.stderr)
    return exit_status(exit)


def _caps(argv: List[str]) -> int:
    from .caps.cli import main as caps_main

    return caps_main(argv)


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["caps"]:
        return _caps(argv[1:])
    args = _parser().parse_args(argv)
    try:
        if args.command == "version":
            print(f"pyvt {__version__}")
            return 0
        if args.command == "boot":
            return _boot(args)
        return _run(args)
    except Error as e:
        print(f"pyvt: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("pyvt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
