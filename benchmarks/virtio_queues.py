#!/usr/bin/env python3
"""A virtio request's cost: a Python VirtioDevice against the native worker.

    python benchmarks/virtio_queues.py [--rounds N]

The guest is the test suite's freestanding virtio-pci driver
(tests/guests/virtio_driver.c, at ring 3): it initializes the device, then
submits requests one at a time (notify, poll the used ring).  Each round
runs it with 1 and with 8 requests of 4 KiB against an entropy device
written in Python (examples/virtio_rng.py's) and against pyvt._virtio's
RngWorker, alternating; a request costs (t8 - t1) / 7.  Prints medians and
the ratio.  Figures drift on shared machines: quote the ratio.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import virtio_guest as g  # noqa: E402
from pyvt.virtio.constants import TYPE_ENTROPY  # noqa: E402


def python_rng_class():
    spec = importlib.util.spec_from_file_location("virtio_rng", ROOT / "examples" / "virtio_rng.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.PythonRng


def one_run(elf: bytes, kind: str, requests: int) -> float:
    vm = g.new_vm()
    try:
        if kind == "python":
            vm.add_virtio(python_rng_class()())
        else:
            vm.add_rng()
        segments = [[(g.DATA + 0x1000 * i, 4096, True)] for i in range(requests)]
        start = time.perf_counter()
        result = g.run(vm, elf, 0x1040 + TYPE_ENTROPY, segments)
        elapsed = time.perf_counter() - start
        assert result.stage_name == "done", result
        return elapsed
    finally:
        vm.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        elf = g.build(Path(tmp))
        per_request = {"python": [], "native": []}
        setup = {"python": [], "native": []}
        for _ in range(args.rounds):
            for kind in per_request:
                t1 = one_run(elf, kind, 1)
                t8 = one_run(elf, kind, 8)
                per_request[kind].append((t8 - t1) / 7)
                setup[kind].append(t1)
    for kind in per_request:
        print(f"{kind:7s} device: run with 1 request {statistics.median(setup[kind]) * 1e3:7.2f} ms, "
              f"per 4 KiB request {statistics.median(per_request[kind]) * 1e6:8.1f} us "
              f"(median of {args.rounds})")
    ratio = statistics.median(per_request["python"]) / statistics.median(per_request["native"])
    print(f"python/native per request: {ratio:.2f}x")


if __name__ == "__main__":
    main()
