"""``python -m pyvt caps``: what virtualization this host can do.

Exit status: 0 when KVM is usable (with ``--require``: when every required
feature holds), 1 when it is not (or a requirement is missing), 2 for a
usage error (an unreadable ``--hw-caps-json`` dump included), 3 if pyvt
itself failed (reported in one line, no traceback).

``--hw-caps-json FILE`` takes the ``PYVT_GET_HW_CAPS`` answer from a dump
(``kernel_module/tests/hwcaps_json`` prints one inside test VMs too slow for
Python) instead of asking ``/dev/pyvt``; it is labelled as that source, as
a live answer would be.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import TextIO

EXIT_OK = 0
EXIT_MISSING = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 3


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pyvt caps",
        description="Report what hardware virtualization this host offers, from CPUID, MSRs and KVM, "
                    "and optionally prove it by running tiny guests.")
    p.add_argument("--json", action="store_true", help="print the report as JSON (schema: pyvt/caps/SCHEMA.md)")
    p.add_argument("--probe", action="store_true", help="run tiny guests to show what really works")
    p.add_argument("--require", nargs="+", action="extend", metavar="FEATURE", default=None,
                   help="exit 0 only if every FEATURE holds (e.g. ept unrestricted_guest irqchip smp "
                        "long_mode, or any KVM_CAP_* name); 1 with the missing list otherwise")
    p.add_argument("--device", default="/dev/kvm", metavar="PATH",
                   help="KVM-API device to inspect: /dev/kvm (default) or /dev/pyvt")
    p.add_argument("--hw-caps-json", metavar="FILE", default=None,
                   help="take the PYVT_GET_HW_CAPS answer from FILE ('-': standard input), a JSON dump shaped like "
                        "pyvt.kvm.Kvm.get_hw_caps() (kernel_module/tests/hwcaps_json prints one), instead of "
                        "asking the device; the other sources are still read on this machine")
    p.add_argument("-v", "--verbose", action="store_true", help="also list unsupported capabilities and CPUID flags")
    return p


def main(argv: Sequence[str] | None = None, stdout: TextIO | None = None) -> int:
    """Run ``pyvt caps`` with *argv* (default: ``sys.argv[1:]``); return the exit status."""
    out = stdout or sys.stdout
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already printed by argparse
        return int(exc.code or 0)
    try:
        return _run(args, out)
    except KeyboardInterrupt:
        print("pyvt caps: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # never a traceback: say what broke, in one line
        print(f"pyvt caps: internal error: {exc.__class__.__name__}: {exc}", file=sys.stderr)
        return EXIT_INTERNAL


def _run(args: argparse.Namespace, out: TextIO) -> int:
    from .collect import HwCapsFileError, collect, read_hw_caps_json
    from .report import PROBE_ONLY_FEATURES, build_report, exit_status, render_text

    hw_caps = None
    if args.hw_caps_json is not None:
        try:
            hw_caps = read_hw_caps_json(args.hw_caps_json)
        except HwCapsFileError as exc:  # the argument is unusable: a usage error
            print(f"pyvt caps: --hw-caps-json: {exc}", file=sys.stderr)
            return EXIT_USAGE
    raw = collect(device=args.device, pyvt_hw_caps=hw_caps)
    wants_probe = args.probe or any(
        name.lower().replace("-", "_") in PROBE_ONLY_FEATURES for name in (args.require or []))
    if wants_probe:
        if raw.kvm.status == "ok":
            from .probe import run_probe
            raw.probe = run_probe(args.device)
        else:
            raw.probe = [{"name": "probe", "status": "skipped",
                          "detail": f"{args.device} is not usable: {raw.kvm.error}"}]
    report = build_report(raw, require=args.require)
    if args.json:
        json.dump(report, out, indent=2, sort_keys=False)
        out.write("\n")
    else:
        out.write(render_text(report, verbose=args.verbose))
    return exit_status(report)
