"""The ``pyvt`` command line (also ``python -m pyvt``).

    pyvt run FILE [--mode long] [--at ADDR] [--timeout S] [--memory 16M]
                  (FILE: a flat binary, or assembly source ending in .S/.s)
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
        return _run(args)
    except Error as e:
        print(f"pyvt: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("pyvt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
