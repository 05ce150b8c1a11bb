"""``pyvt incoming tcp:HOST:PORT [--control PATH [--name NAME]]``: waits for one VM that
``vm.migrate`` (or ``pyvt ctl PATH migrate``) sends, runs it to its end with
its console on stdout (from where the source's stopped) and exits as
``pyvt boot`` would: the debug-exit status, 0 after hlt or a reset, 124 on
timeout, 1 when the guest failed; 2 when no VM arrived whole."""

from __future__ import annotations

import sys


def add_parser(sub, timeout_type, timeout_help: str, statuses: str, control_arguments) -> None:
    incoming = sub.add_parser(
        "incoming", help="receive a live-migrating VM and run it",
        description=f"Waits on URI (tcp:HOST:PORT, unix:PATH) for one VM sent by a live "
        f"migration, then runs it with the serial console on stdout.  {statuses}")
    incoming.add_argument("uri", help="where to listen: tcp:HOST:PORT or unix:PATH")
    control_arguments(incoming)  # --control PATH, --name NAME, as run and boot have
    incoming.add_argument("--timeout", type=timeout_type, default=None, help=timeout_help)
    incoming.add_argument("--wait", type=timeout_type, default=None,
                          help="seconds to wait for the VM to arrive (default: no limit)")
    incoming.add_argument("--no-stdin", action="store_true",
                          help="do not pass standard input to the serial port")
    incoming.add_argument("--backend", default=None, help="device path (default: /dev/kvm)")


def run(args, report, feed_stdin, exit_status) -> int:
    from ..vm import Vm
    from .destination import Listener

    listener = Listener(args.uri)
    report(f"waiting for a VM on {listener.uri}")
    with Vm.incoming(listener, backend=args.backend, timeout=args.wait) as vm:
        report(f"received a VM of {vm.memory.size >> 20} MiB, {len(vm.vcpus)} vCPU(s)")
        vm.console.stream(sys.stdout)
        vm.debugcon.stream(sys.stdout)
        if not args.no_stdin:
            feed_stdin(vm.console)
        if args.control is not None:
            vm.serve_control(args.control, args.name)
        exit = vm.run(timeout=args.timeout)
        sys.stdout.flush()
    report(exit.describe() if exit.failed else repr(exit))
    return exit_status(exit)
