"""``pyvt top``: the pyvt VMs on this host that serve a control socket,
found in the runtime directory (:func:`pyvt.control.runtime_dir`), with
their name, pid, vCPUs, memory, state, exits/s by reason, % of time in the
guest and dirty pages/s.

Rates come from two ``query-stats`` samples ``--interval`` seconds apart,
timed by the VM's own clock.  ``% guest`` is the time the vCPUs spent
inside KVM_RUN over the interval, per vCPU (100: every vCPU always in the
guest).  ``dirty pages/s`` is 0 unless the VM logs its writes (a migration,
a snapshot restore's tracking).

``pyvt top`` is a live view drawn with ``rich`` (``pip install
'pyvt[top]'``); ``pyvt top --json`` prints one sample as a JSON list (one
object per VM) and exits, and needs no ``rich``.  A VM that cannot be
reached (it ended between the listing and the query) is listed with state
``"unreachable"``.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

from .control import registered_vms, runtime_dir
from .ctl import Connection, Disconnected, UsageError

EXIT_OK = 0
EXIT_USAGE = 2
#: How many reasons the live view lists per VM (the busiest).
TOP_REASONS = 4


class _Probe:
    """One VM's connection and its samples."""

    def __init__(self, entry: dict):
        self.entry = entry
        self.connection: Optional[Connection] = None
        self.samples: List[dict] = []
        self.status: Optional[dict] = None
        try:
            self.connection = Connection(entry["socket"])
        except UsageError:
            self.connection = None

    def sample(self) -> None:
        if self.connection is None:
            return
        try:
            if self.status is None:
                self.status = self.connection.call("query-status").get("return")
            reply = self.connection.call("query-stats")
        except Disconnected:
            self.close()
            return
        if "return" in reply:
            self.samples.append(reply["return"])

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None

    def row(self) -> dict:
        entry = self.entry
        row = {"name": entry.get("name"), "pid": entry.get("pid"), "socket": entry.get("socket"),
               "vcpus": entry.get("vcpus"), "memory": entry.get("memory")}
        if len(self.samples) < 2:
            row.update(state="unreachable", interval_s=None, exits_per_s=None,
                       exits_per_s_by_reason=None, native_exits_per_s=None,
                       python_exits_per_s=None, guest_percent=None, dirty_pages_per_s=None,
                       stats=None)
            return row
        first, last = self.samples[0], self.samples[-1]
        row.update(rates(first, last))
        row["vcpus"] = len(last["vcpus"])
        if self.status is not None:
            row["memory"] = self.status.get("memory", row["memory"])
        row["state"] = last.get("status") or (self.status or {}).get("status")
        row["stats"] = {key: last["vm"].get(key) for key in
                        ("kvm_exits", "native_exits", "python_exits", "guest_time_ns",
                         "exits_by_reason", "dirty_pages")}
        return row


def rates(first: dict, last: dict) -> Dict[str, object]:
    """The rates between two ``query-stats`` replies of one VM."""
    seconds = max((last["time_ns"] - first["time_ns"]) / 1e9, 1e-9)
    a, b = first["vm"], last["vm"]
    by_reason = {}
    before = a.get("exits_by_reason", {})
    for reason, count in b.get("exits_by_reason", {}).items():
        delta = count - before.get(reason, 0)
        if delta:
            by_reason[reason] = round(delta / seconds, 1)
    def per_second(key: str) -> float:
        return round((b.get(key, 0) - a.get(key, 0)) / seconds, 1)

    vcpus = max(len(last["vcpus"]), 1)
    guest = (b.get("guest_time_ns", 0) - a.get("guest_time_ns", 0)) / (seconds * 1e9 * vcpus)
    dirty = (b.get("dirty_pages", 0) - a.get("dirty_pages", 0)) / seconds
    return {"interval_s": round(seconds, 3),
            "exits_per_s": per_second("kvm_exits"),
            "exits_per_s_by_reason": dict(sorted(by_reason.items(), key=lambda kv: -kv[1])),
            "native_exits_per_s": per_second("native_exits"),
            "python_exits_per_s": per_second("python_exits"),
            "guest_percent": round(min(max(guest, 0.0), 1.0) * 100, 1),
            "dirty_pages_per_s": round(max(dirty, 0.0), 1)}


def sample(interval: float, directory: Optional[str] = None) -> List[dict]:
    """One snapshot of every registered VM: rates over ``interval`` seconds."""
    probes = [_Probe(entry) for entry in registered_vms(directory)]
    try:
        for probe in probes:
            probe.sample()
        time.sleep(interval)
        for probe in probes:
            probe.sample()
    finally:
        for probe in probes:
            probe.close()
    return [probe.row() for probe in probes]


def _size(n: Optional[int]) -> str:
    if n is None:
        return "?"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.0f} {unit}"
        value /= 1024
    return f"{value:.0f} TiB"


def table(rows: List[dict], directory: str):
    """The rows as a rich Table."""
    from rich.table import Table

    view = Table(title=f"pyvt VMs ({directory})", expand=True)
    columns: List[Tuple[str, Any]] = [
        ("name", "left"), ("pid", "right"), ("vCPUs", "right"), ("memory", "right"),
        ("state", "left"), ("exits/s", "right"), ("by reason (/s)", "left"),
        ("% guest", "right"), ("dirty pages/s", "right")]
    for column, justify in columns:
        view.add_column(column, justify=justify)
    for row in rows:
        reasons = row.get("exits_per_s_by_reason") or {}
        busiest = ", ".join(f"{name} {rate:g}" for name, rate in
                            list(reasons.items())[:TOP_REASONS])
        view.add_row(str(row["name"]), str(row["pid"]), str(row["vcpus"]),
                     _size(row["memory"]), str(row["state"]),
                     "-" if row["exits_per_s"] is None else f"{row['exits_per_s']:g}",
                     busiest or "-",
                     "-" if row["guest_percent"] is None else f"{row['guest_percent']:.1f}",
                     "-" if row["dirty_pages_per_s"] is None else f"{row['dirty_pages_per_s']:g}")
    if not rows:
        view.caption = "no VM with a control socket (pyvt run|boot --control PATH)"
    return view


def _parser():
    from .cli import _Parser, _seconds

    parser = _Parser(prog="pyvt top", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true",
                        help="print one sample as JSON and exit (needs no rich)")
    parser.add_argument("--interval", type=_seconds, default=1.0,
                        help="seconds between the two samples a rate is taken from (default 1)")
    parser.add_argument("--dir", default=None,
                        help=f"the runtime directory (default {runtime_dir()})")
    return parser


def main(argv: List[str]) -> int:
    from .cli import _report

    args = _parser().parse_args(argv)
    interval = args.interval if args.interval is not None else 1.0
    if interval <= 0:
        _report("--interval must be more than 0 seconds")
        return EXIT_USAGE
    if args.json:
        print(json.dumps(sample(interval, args.dir), indent=2), flush=True)
        return EXIT_OK
    try:
        from rich.console import Console
        from rich.live import Live
    except ImportError:
        _report("pyvt top's live view needs the rich library: pip install 'pyvt[top]' "
                "(or pip install rich); pyvt top --json works without it")
        return EXIT_USAGE
    directory = args.dir or runtime_dir()
    console = Console()
    try:
        with Live(table([], directory), console=console, auto_refresh=False,
                  screen=console.is_terminal) as live:
            while True:
                live.update(table(sample(interval, args.dir), directory), refresh=True)
    except KeyboardInterrupt:  # how one leaves a live view
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
