"""Clones made ahead of time: :meth:`pyvt.Snapshot.prepare_clones`.

Most of what :meth:`pyvt.Vm.from_snapshot` costs is the kernel's work:
creating the VM and its vCPUs, their CPUID tables, the memory slot (here
about 0.3 ms, as much as half a fresh VM).  None of it depends on when the
clone is wanted, so a program that knows it will want clones (a server
spawning one VM per request, a fuzzer) can have them made beforehand, off
its critical path.  ``snap.prepare_clones(n)`` makes ``n`` whole clones
now; ``Vm.from_snapshot(snap)`` then hands one out, after writing what
changes while a VM waits and the snapshot says otherwise: the vCPUs'
registers and TSCs (and, with an in-kernel irqchip, the LAPIC, MSRs and
events), the KVM clock, the devices (see pyvt.snapshot's restore of a
vCPU that holds its state).  Their memory is the snapshot's, copy-on-write,
untouched until they run.  A clone handed out is exactly the clone
``from_snapshot`` would have made at that instant; the prepared ones left
are closed with the snapshot.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, List, Optional, Tuple

from .errors import ArgumentError

if TYPE_CHECKING:
    from .snapshot import Snapshot
    from .vm import Vm

#: (VM class, backend path, the clone) of each prepared clone.
Prepared = Tuple[type, str, "Vm"]


def prepare(snap: "Snapshot", count: int, vm_class: type, path: str,
            make: Callable[[], "Vm"]) -> None:
    """Adds ``count`` clones of ``snap`` (each made by ``make``) to its pool."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ArgumentError(f"prepare_clones() takes a number of clones >= 0, not {count!r}")
    pool = prepared(snap)
    for _ in range(count):
        pool.append((vm_class, path, make()))


def take(snap: "Snapshot", vm_class: type, path: str,
         hand_out: Callable[["Vm"], None]) -> Optional["Vm"]:
    """A prepared clone of ``snap`` made as ``vm_class`` on ``path``, brought
    to the snapshot's state of now by ``hand_out``; None if there is none."""
    pool = prepared(snap)
    for position, (cls, backend, vm) in enumerate(pool):
        if cls is vm_class and backend == path:
            del pool[position]
            try:
                hand_out(vm)
            except BaseException:
                vm.close()
                raise
            return vm
    return None


def close_all(snap: "Snapshot") -> None:
    """Closes the prepared clones nobody took."""
    pool = prepared(snap)
    while pool:
        pool.pop()[2].close()


def prepared(snap: "Snapshot") -> List[Prepared]:
    """``snap``'s pool (kept on the snapshot, made on first use)."""
    pool = snap.__dict__.get("_prepared_clones")
    if pool is None:
        pool = snap.__dict__["_prepared_clones"] = []
    return pool
