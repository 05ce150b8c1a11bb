"""How fast the guest dirties memory, for ``vm.stats``: the pages KVM's dirty
log (ring or bitmap) reported at each harvest (:mod:`pyvt.dirty_pages`).

Pages are only known while the VM logs its writes (a snapshot restore's
tracking, a migration's rounds, ``vm.memory.dirty_pages()``); otherwise no
harvest happens and the rate is 0.  The rate is that of the last harvest:
its pages over the time since the harvest before it, as long as the last
harvest is recent (:data:`STALE_AFTER` seconds), else 0.
"""

from __future__ import annotations

import threading
import time

from .kvm_stats import StatsDescriptor

#: Seconds after which the last harvest no longer tells the current rate.
STALE_AFTER = 2.0


#: What the keys this module gives ``vm.stats`` are.
DIRTY_PAGE_STATS = {
    "dirty_pages": StatsDescriptor("dirty_pages"),
    "dirty_pages_per_s": StatsDescriptor("dirty_pages_per_s", "instant"),
}


class DirtyRate:
    """Counts harvested pages; one per :class:`pyvt.GuestMemory`."""

    def __init__(self):
        self._lock = threading.Lock()
        self.total = 0  # pages KVM reported written, over all harvests
        self._last_time = None
        self._last_pages = 0
        self._last_interval = 0.0

    def record(self, logged: dict) -> None:
        """One harvest: ``logged`` is {slot: pageset of pages written}."""
        self.record_pages(sum(bits.bit_count() for bits in logged.values()))

    def record_pages(self, pages: int) -> None:
        """One harvest of ``pages`` pages written."""
        now = time.monotonic()
        with self._lock:
            self.total += pages
            if self._last_time is not None:
                self._last_interval = now - self._last_time
                self._last_pages = pages
            self._last_time = now

    def per_second(self) -> int:
        """Pages per second at the last harvest (rounded), 0 without a
        recent one (the VM does not log its writes)."""
        with self._lock:
            if (self._last_time is None or self._last_interval <= 0
                    or time.monotonic() - self._last_time > STALE_AFTER):
                return 0
            return round(self._last_pages / self._last_interval)
