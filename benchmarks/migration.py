#!/usr/bin/env python3
"""Live migration: pyvt against QEMU's own, on this host, over loopback.

    python benchmarks/migration.py [--rounds N] [--sizes 64,256] [--downtime-ms 30]
                                   [--pyvt-pages-per-line 16] [--pyvt-working-set 1024]
                                   [--no-qemu]

For each guest size (MiB): pyvt migrates a running guest (the tests' ring-3
dirtying guest, tests/guests/migrate_dirty.S, every page of RAM touched
first) from this process to a `pyvt incoming` process; QEMU migrates a
multiboot kernel of the same size that touches every page and then keeps
writing pages (benchmarks/kernels/dirty.c) between two qemu-system-x86_64
-accel kvm processes (`-incoming tcp:...`, QMP `migrate`, `query-migrate`).
Both get the same downtime target (QEMU's downtime-limit) and no bandwidth
cap (QEMU's max-bandwidth raised from its 32 MiB/s default).  Prints the
medians of downtime and total time, each side's measured dirty rate, and
the ratios pyvt / QEMU (lower is better).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from boot_vs_qemu import ensure_qemu  # noqa: E402
from kernelbuild import build_kernel  # noqa: E402
from migration_guest import BUFFER, make_vm, wait_for_lines  # noqa: E402

#: The pyvt guest's dirtying: pages written per line, spin rounds after it.
PER_LINE, SPIN = 16, 200_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pyvt_once(size_mib: int, downtime_ms: float, tmp: Path, per_line: int = PER_LINE,
              working_set: int = 1024) -> dict:
    port = free_port()
    dest = subprocess.Popen([sys.executable, "-m", "pyvt", "incoming", f"tcp:127.0.0.1:{port}",
                             "--no-stdin"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    vm = None
    try:
        assert b"waiting" in dest.stderr.readline()
        vm = make_vm(lines=1 << 40, spin=SPIN, pages=working_set, per_line=per_line, out_dir=tmp,
                     memory=f"{size_mib}M")
        # Every page holds data (as the QEMU guest's): the whole guest travels.
        start = BUFFER + working_set * 4096
        vm.memory.view[start:size_mib << 20] = b"\x5a" * ((size_mib << 20) - start)
        thread = threading.Thread(target=vm.run, daemon=True)
        thread.start()
        wait_for_lines(vm, 10)
        result = vm.migrate(f"tcp:127.0.0.1:{port}", downtime_ms=downtime_ms)
        thread.join(30)
        if result.status != "completed":
            raise RuntimeError(f"pyvt's migration failed: {result.error}")
        return {"downtime_ms": result.downtime_ms, "total_ms": result.total_ms,
                "dirty_pages_rate": result.dirty_pages_rate, "rounds": result.rounds,
                "mib": result.transferred_bytes / (1 << 20)}
    finally:
        dest.kill()
        dest.wait()
        if vm is not None:
            vm.close()


class Qmp:
    def __init__(self, path: str):
        deadline = time.monotonic() + 20
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.file = self.sock.makefile("rw")
        self.file.readline()  # the greeting
        self.call("qmp_capabilities")

    def call(self, name: str, **arguments):
        self.file.write(json.dumps({"execute": name, "arguments": arguments}) + "\n")
        self.file.flush()
        while True:
            reply = json.loads(self.file.readline())
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise RuntimeError(f"QMP {name}: {reply['error']}")

    def close(self):
        self.sock.close()


def qemu_once(qemu: str, kernel: Path, size_mib: int, downtime_ms: float, tmp: Path) -> dict:
    port = free_port()
    common = [qemu, "-accel", "kvm", "-cpu", "qemu64", "-m", f"{size_mib}M", "-kernel",
              str(kernel), "-display", "none", "-monitor", "none", "-nodefaults",
              "-no-user-config"]
    log = tmp / f"serial{port}.log"
    src_qmp, dst_qmp = str(tmp / f"src{port}.qmp"), str(tmp / f"dst{port}.qmp")
    dest = subprocess.Popen(common + ["-serial", "null", "-qmp",
                                      f"unix:{dst_qmp},server=on,wait=off",
                                      "-incoming", f"tcp:127.0.0.1:{port}"],
                            stderr=subprocess.DEVNULL)
    source = subprocess.Popen(common + ["-serial", f"file:{log}", "-qmp",
                                        f"unix:{src_qmp},server=on,wait=off"],
                              stderr=subprocess.DEVNULL)
    try:
        qmp = Qmp(src_qmp)
        Qmp(dst_qmp).close()  # the destination is up
        deadline = time.monotonic() + 120  # firmware, then the kernel touches every page
        while b"dirtying" not in (log.read_bytes() if log.exists() else b""):
            if time.monotonic() > deadline:
                raise RuntimeError("the QEMU guest did not start dirtying in 120 s")
            time.sleep(0.05)
        time.sleep(0.5)
        qmp.call("migrate-set-parameters", **{"downtime-limit": int(downtime_ms),
                                              "max-bandwidth": 1 << 40})
        qmp.call("migrate", uri=f"tcp:127.0.0.1:{port}")
        rate = 0
        while True:
            info = qmp.call("query-migrate")
            rate = max(rate, info.get("ram", {}).get("dirty-pages-rate", 0))
            if info.get("status") in ("completed", "failed", "cancelled"):
                break
            time.sleep(0.005)
        if info["status"] != "completed":
            raise RuntimeError(f"QEMU's migration {info['status']}: {info}")
        qmp.close()
        return {"downtime_ms": info["downtime"], "total_ms": info["total-time"],
                "dirty_pages_rate": rate, "rounds": info["ram"].get("dirty-sync-count"),
                "mib": info["ram"]["transferred"] / (1 << 20)}
    finally:
        for p in (source, dest):
            p.kill()
            p.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sizes", default="64,256")
    parser.add_argument("--downtime-ms", type=float, default=30.0)
    parser.add_argument("--no-qemu", action="store_true")
    parser.add_argument("--pyvt-pages-per-line", type=int, default=PER_LINE,
                        help="the pyvt guest's dirty rate: pages written between two lines "
                        f"(default {PER_LINE}; each line also waits {SPIN} loop rounds)")
    parser.add_argument("--pyvt-working-set", type=int, default=1024,
                        help="pages the pyvt guest writes among (a power of two; default "
                        "1024: 4 MiB)")
    args = parser.parse_args()
    qemu = None if args.no_qemu else ensure_qemu()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        kernel = None if qemu is None else build_kernel(
            "dirty", tmp, source=HERE / "kernels" / "dirty.c")
        for size in (int(s) for s in args.sizes.split(",")):
            rows = {"pyvt": [], "qemu": []}
            for _ in range(args.rounds):
                rows["pyvt"].append(pyvt_once(size, args.downtime_ms, tmp,
                                              args.pyvt_pages_per_line, args.pyvt_working_set))
                if qemu is not None:
                    rows["qemu"].append(qemu_once(qemu, kernel, size, args.downtime_ms, tmp))
            print(f"\n{size} MiB guest, downtime target {args.downtime_ms:g} ms, "
                  f"{args.rounds} runs each (medians):")
            print(f"  {'':6} {'downtime ms':>12} {'total ms':>10} {'dirty pages/s':>14} "
                  f"{'rounds':>7} {'MiB sent':>9}")
            med = {}
            for name, runs in rows.items():
                if not runs:
                    continue
                med[name] = {k: statistics.median(r[k] or 0 for r in runs) for k in runs[0]}
                m = med[name]
                print(f"  {name:6} {m['downtime_ms']:12.1f} {m['total_ms']:10.1f} "
                      f"{m['dirty_pages_rate']:14.0f} {m['rounds']:7.0f} {m['mib']:9.1f}")
            if "qemu" in med:
                for key in ("downtime_ms", "total_ms"):
                    ratio = med["pyvt"][key] / max(med["qemu"][key], 1e-9)
                    print(f"  pyvt/QEMU {key}: {ratio:.2f}")
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
