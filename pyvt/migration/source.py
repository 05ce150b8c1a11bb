"""The sending side of a live migration: ``vm.start_migration(uri)``.

A :class:`Migration` runs in its own thread while the guest runs on:

1. it checks the VM can move (:func:`pyvt.migration.machine.check_movable`),
   connects and sends the machine's description (``SETUP``);
2. pre-copy: round 0 sends every non-zero page, each later round the pages
   the guest wrote since the round before (KVM's dirty ring or bitmap, read
   through a baseline of :mod:`pyvt.memory` of its own, so snapshots and
   ``vm.memory.dirty_pages()`` callers see every write as before), and
   measures the bandwidth and the guest's dirty rate;
3. when what is left would go in the downtime target at the measured
   bandwidth, stop-and-copy: ``vm.pause()``, the last dirty pages, the
   state (``STATE``, ``HOOKS``), ``END``; on the destination's ``ACK`` it
   sends ``COMMIT`` and ends the source's ``vm.run()`` with
   :class:`pyvt.exits.Migrated`.

Auto-converge: while the guest dirties pages faster than half the link
carries them, or what is left to send stops shrinking, each round raises
``throttle_percent`` (20, then +10 a round, up to 99): a throttle thread keeps the vCPUs paused that share of every
20 ms.  At 99 % for three rounds the stop-and-copy starts anyway (the
downtime then exceeds the target, and says so).

Whatever fails before ``COMMIT`` (a refused or dropped connection, an
``ERROR`` from the destination, a cancel, a timeout), the source resumes
(if the migration paused it) and runs on unchanged; the result says why.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional

from .. import exits, pageset, run_control
from ..errors import ArgumentError, Error, MigrationError
from . import machine, state, stream
from .stream import PAGES

PAGE_SIZE = 4096
#: Bytes per PAGES chunk.
CHUNK = 1 << 20
_ZERO = bytes(CHUNK)
#: How long a peer may stay silent before the migration fails.
PEER_TIMEOUT = 30.0
#: The throttle's period: the vCPUs are parked throttle_percent of it.
THROTTLE_PERIOD = 0.02
MAX_THROTTLE = 99
#: Rounds at the highest throttle before stop-and-copy is forced.
FORCE_AFTER = 3
#: The downtime the stop-and-copy spends besides pages (pause, state,
#: acknowledgement), until measured: seconds.
_FIXED_COST = 0.008


@dataclass
class MigrationResult:
    """How a migration ended (:meth:`Migration.wait`, ``vm.migrate``).
    ``status``: "completed", "failed" or "cancelled"; times in ms;
    ``transferred_bytes`` counts everything sent."""

    status: str
    downtime_ms: Optional[float]
    total_ms: float
    transferred_bytes: int
    rounds: int
    error: Optional[str] = None
    remaining_bytes: int = 0
    dirty_pages_rate: float = 0.0
    throttle_percent: int = 0
    uri: str = ""

    @property
    def completed(self) -> bool:
        return self.status == "completed"

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


def next_throttle(throttle: int, rounds: int, dirty_rate: float, bandwidth: float,
                  remaining: int, last_remaining: int) -> int:
    """Auto-converge's throttle for the next round (percent): up when, from
    the third round on, the guest dirties (``dirty_rate``, bytes/s) faster
    than half the link carries (``bandwidth``), or what is left to send
    (``remaining``) stopped shrinking; 20 first, then 10 more a round, at
    most MAX_THROTTLE."""
    if rounds >= 2 and (dirty_rate > bandwidth / 2 or remaining >= last_remaining):
        return min(MAX_THROTTLE, 20 if not throttle else throttle + 10)
    return throttle


class _Cancelled(Exception):
    pass


class DirtyTracker:
    """The pages of ``memory`` written since the last :meth:`collect`, kept
    as a baseline of its own in every region (see :mod:`pyvt.memory`)."""

    closed = False

    def __init__(self, memory):
        self.memory = memory
        memory.track_dirty_pages()
        memory.fold()  # what came before is not ours
        with memory._dirty_lock:
            for region in memory.regions:
                region.baselines[self] = 0

    def collect(self):
        """[(region, pageset)] of the pages written since the last call."""
        self.memory.fold()
        found = []
        with self.memory._dirty_lock:
            for region in self.memory.regions:
                found.append((region, region.baselines.get(self, 0)))
                region.baselines[self] = 0
        return found

    def close(self) -> None:
        self.closed = True  # the memory drops closed baselines at its next fold
        for region in self.memory.regions:
            region.baselines.pop(self, None)


class Migration:
    """One outgoing migration of ``vm`` to ``uri``; see the module docstring."""

    def __init__(self, vm, uri: str, downtime_ms: float = 30.0):
        if isinstance(downtime_ms, bool) or not isinstance(downtime_ms, (int, float)) \
                or not downtime_ms > 0:
            raise ArgumentError(f"downtime_ms must be a positive number, not {downtime_ms!r}")
        stream.parse_uri(uri)
        machine.check_movable(vm)
        self.vm = vm
        self.uri = uri
        self.downtime_ms = float(downtime_ms)
        self.status = "active"
        self.error: Optional[str] = None
        self.rounds = 0
        self.remaining_bytes = 0
        self.dirty_pages_rate = 0.0
        self.throttle_percent = 0
        self.downtime: Optional[float] = None
        self._channel: Optional[stream.Channel] = None
        self._setup = json.dumps(machine.describe(vm)).encode()
        self._lock = threading.Lock()
        self._cancelled = False
        self._committed = False
        self._done = threading.Event()
        self._started = time.monotonic()
        self._ended: Optional[float] = None
        self._throttle_stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name="pyvt-migration", daemon=True)
        self._emit("setup")
        self._thread.start()

    # -- the public side -------------------------------------------------------

    def cancel(self) -> None:
        """Stops the migration unless it has committed; the source runs on."""
        with self._lock:
            if self._committed or self._done.is_set():
                return
            self._cancelled = True
            channel = self._channel
        if channel is not None:
            try:
                channel.send_error("the migration was cancelled")
            except Exception:
                pass
            try:
                channel.sock.shutdown(2)  # wakes a blocked send or receive
            except OSError:
                pass

    def wait(self, timeout: Optional[float] = None) -> MigrationResult:
        """Waits for the end (``timeout`` seconds at most: then
        :class:`pyvt.MigrationError`) and returns the result."""
        if not self._done.wait(timeout):
            raise MigrationError(f"the migration to {self.uri} is still going after {timeout} s")
        return self.result()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def result(self) -> MigrationResult:
        end = self._ended if self._ended is not None else time.monotonic()
        channel = self._channel
        return MigrationResult(
            status=self.status,
            downtime_ms=None if self.downtime is None else self.downtime * 1000,
            total_ms=(end - self._started) * 1000,
            transferred_bytes=channel.sent_bytes if channel is not None else 0,
            rounds=self.rounds, error=self.error, remaining_bytes=self.remaining_bytes,
            dirty_pages_rate=self.dirty_pages_rate, throttle_percent=self.throttle_percent,
            uri=self.uri)

    def info(self) -> Dict[str, Any]:
        """The migration's figures so far (``query-migrate``)."""
        return self.result().as_dict()

    def __repr__(self) -> str:
        return f"<Migration to {self.uri}: {self.status}, {self.rounds} round(s)>"

    # -- the thread ------------------------------------------------------------

    def _emit(self, status: str) -> None:
        emit = getattr(self.vm, "_emit_event", None)
        if emit is not None:
            try:
                emit("MIGRATION", {"status": status, "uri": self.uri})
            except Exception:
                pass

    def _main(self) -> None:
        paused = throttle = None
        tracker = None
        try:
            self._emit("active")
            channel = stream.connect(self.uri, PEER_TIMEOUT)
            with self._lock:
                self._channel = channel
                if self._cancelled:
                    raise _Cancelled()
            channel.send_preamble()
            channel.expect_preamble()
            channel.send(stream.SETUP, 0, self._setup)
            channel.recv(stream.READY)
            tracker = DirtyTracker(self.vm.memory)
            throttle = threading.Thread(target=self._throttle, name="pyvt-migration-throttle",
                                        daemon=True)
            throttle.start()
            sent = self._precopy(channel, tracker)
            self._throttle_stop.set()
            throttle.join()
            paused = self._pause()
            self._stop_and_copy(channel, tracker, sent, paused)
        except _Cancelled:
            self.status, self.error = "cancelled", "the migration was cancelled"
        except BaseException as e:
            with self._lock:
                cancelled = self._cancelled
            if cancelled:
                self.status, self.error = "cancelled", "the migration was cancelled"
            else:
                self.status = "failed"
                self.error = str(e) if isinstance(e, Error) else f"{type(e).__name__}: {e}"
                if self._channel is not None:
                    self._channel.send_error(self.error)
        finally:
            self._throttle_stop.set()
            if throttle is not None:
                throttle.join()
            if paused and not self._committed:
                self._resume()
            if tracker is not None:
                tracker.close()
            if self._channel is not None:
                self._channel.close()
            if self.status != "completed":
                self._ended = time.monotonic()
            self._done.set()
            if self.status != "completed":  # a completed one was announced already
                self._emit(self.status)

    def _check_cancel(self) -> None:
        if self._cancelled:
            raise _Cancelled()

    def _send_pages(self, channel, region, first: int, count: int, skip_zero: bool) -> int:
        """Sends pages first..first+count of region in chunks; the number sent."""
        chunks = 0
        view = memoryview(region.buffer)
        try:
            end = (first + count) * PAGE_SIZE
            for at in range(first * PAGE_SIZE, end, CHUNK):
                self._check_cancel()
                # A copy: the guest may write the pages while they are sent
                # (they are then dirty again and go in a later round).
                data = view[at:min(at + CHUNK, end)].tobytes()
                if skip_zero and data == _ZERO[:len(data)]:
                    continue
                channel.raise_peer_error()
                channel.send(PAGES, region.gpa + at, data)
                chunks += 1
        finally:
            view.release()
        return chunks

    def _send_dirty(self, channel, dirty) -> int:
        chunks = 0
        for region, pages in dirty:
            for first, count in pageset.runs(pages):
                chunks += self._send_pages(channel, region, first, count, False)
        return chunks

    def _precopy(self, channel, tracker) -> int:
        """Rounds until the rest fits the downtime target; PAGES chunks sent."""
        start, before = time.monotonic(), channel.sent_bytes
        chunks = 0
        for region in self.vm.memory.regions:
            chunks += self._send_pages(channel, region, 0, region.pages, True)
        channel.send(stream.ROUND, 0)
        self.rounds = 1
        last_collect = start
        bandwidth = (channel.sent_bytes - before) / max(time.monotonic() - start, 1e-6)
        at_max = 0
        last_remaining = 1 << 62
        while True:
            self._check_cancel()
            self._check_running()
            dirty = tracker.collect()
            now = time.monotonic()
            pages = sum(p.bit_count() for _, p in dirty)
            self.remaining_bytes = pages * PAGE_SIZE
            self.dirty_pages_rate = pages / max(now - last_collect, 1e-6)
            last_collect = now
            budget = max(self.downtime_ms / 1000 - _FIXED_COST, self.downtime_ms / 4000)
            if self.remaining_bytes <= bandwidth * budget or at_max >= FORCE_AFTER:
                tracker.pending = dirty  # the last round sends them, with what comes after
                return chunks
            self.throttle_percent = next_throttle(
                self.throttle_percent, self.rounds, self.dirty_pages_rate * PAGE_SIZE,
                bandwidth, self.remaining_bytes, last_remaining)
            last_remaining = self.remaining_bytes
            if self.throttle_percent >= MAX_THROTTLE:
                at_max += 1
            start, before = time.monotonic(), channel.sent_bytes
            chunks += self._send_dirty(channel, dirty)
            channel.send(stream.ROUND, self.rounds)
            self.rounds += 1
            took = time.monotonic() - start
            if channel.sent_bytes - before > 4 * CHUNK:  # enough to measure
                bandwidth = (channel.sent_bytes - before) / max(took, 1e-6)

    def _check_running(self) -> None:
        status = getattr(self.vm, "status", "running")
        if self.vm.closed or status not in ("running", "paused", "created"):
            raise MigrationError(f"the VM is {'closed' if self.vm.closed else status}: "
                                 "it stopped running during the migration")

    def _throttle(self) -> None:
        """Parks the vCPUs throttle_percent of every period (auto-converge)."""
        while not self._throttle_stop.is_set():
            share = self.throttle_percent / 100
            if not share:
                self._throttle_stop.wait(THROTTLE_PERIOD)
                continue
            try:
                if getattr(self.vm, "status", None) != "running":
                    self._throttle_stop.wait(THROTTLE_PERIOD)
                    continue
                self.vm.pause()
                try:
                    self._throttle_stop.wait(THROTTLE_PERIOD * share)
                finally:
                    self.vm.resume()
            except Error:
                return  # the VM ended: the migration notices
            self._throttle_stop.wait(THROTTLE_PERIOD * (1 - share))

    def _pause(self) -> bool:
        """Pauses the VM for the stop-and-copy; False if it was paused
        already (by its user: it stays paused if the migration fails)."""
        self._check_running()
        if self.vm.status == "paused":
            self._pause_started = time.monotonic()
            return False
        self._pause_started = time.monotonic()
        self.vm.pause()
        return True

    def _resume(self) -> None:
        try:
            if not self.vm.closed:
                self.vm.resume()
        except Error:
            pass

    def _stop_and_copy(self, channel, tracker, chunks: int, paused: bool) -> None:
        vm = self.vm
        vm._sync_devices()  # the console's queued output, before its state is read
        pending = getattr(tracker, "pending", [])
        merged = {region.slot: (region, pages) for region, pages in pending}
        for region, pages in tracker.collect():
            old = merged.get(region.slot, (region, 0))[1]
            merged[region.slot] = (region, old | pages)
        dirty = list(merged.values())
        self.remaining_bytes = sum(p.bit_count() for _, p in dirty) * PAGE_SIZE
        chunks += self._send_dirty(channel, dirty)
        channel.send(stream.ROUND, self.rounds)
        self.rounds += 1
        snap = state.take(vm)
        try:
            channel.send(stream.STATE, 0, state.encode(snap))
            channel.send(stream.HOOKS, 0, state.encode_hooks(snap.hooks))
        finally:
            snap.close()
        channel.send(stream.END, chunks)
        channel.recv(stream.ACK)
        with self._lock:
            if self._cancelled:
                raise _Cancelled()
            self._committed = True
        # From here the VM is the destination's: this one never runs again.
        try:
            channel.send(stream.COMMIT)
            channel.settimeout(5.0)
            channel.recv(stream.RUNNING)
        except MigrationError:
            pass  # the destination has the VM; its confirmation got lost
        self.downtime = time.monotonic() - self._pause_started
        self.remaining_bytes = 0
        # Announced before the run ends: a `pyvt run` source exits with it,
        # closing its control socket, and `pyvt ctl migrate` wants the figures.
        self.status = "completed"
        self._ended = time.monotonic()
        self._emit("completed")
        moved = exits.Migrated(self.uri, self.downtime * 1000)
        vm.end_run(moved)
        vm._set_status("migrated")
        # The VM stays paused; once the run has returned, the next run()
        # returns Migrated at once too instead of parking.
        control = run_control.of(vm)
        deadline = time.monotonic() + 5.0
        while control.active and time.monotonic() < deadline:
            time.sleep(0.001)
        if not control.active:
            vm.end_run(moved)
