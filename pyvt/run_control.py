"""Run control: pausing, resuming and ending a ``vm.run()`` from another
thread, the VM's run status, and its events.

``vm.run()`` (:func:`pyvt.boot.run`) runs each vCPU in its own thread.  Each
of them passes :meth:`RunControl.hold` before every ``KVM_RUN``: while the
VM is paused it parks there, outside ``KVM_RUN`` and without its run lock,
so that the pausing thread can take ``vm.snapshot()``, ``cpu.save_state()``,
``vm.save_clock()``...  :meth:`RunControl.pause` kicks every vCPU of the run
(``cpu.stop()``, again every few milliseconds until it parks: a kick that
lands between two runs is lost) and returns once all of them are parked.
A parked vCPU first completes the write its last exit left pending (as a
snapshot does), so that nothing the guest did is lost or done twice.
:meth:`RunControl.resume` lets them go on where they were.  A pause does
not count against ``run(timeout=...)``.

:meth:`RunControl.end_run` makes the active run return a given exit (the
control socket's ``quit``; a completed migration's ``exits.Migrated``).
With no run active, the next ``run()`` returns it at once without running
the guest: a VM that migrated away, or that was told to quit before it
started, must not run again by accident.

Status: ``"created"`` (never run), ``"running"``, ``"paused"``,
``"shutdown"`` (the last run returned), or what migration sets
(``"inmigrate"``, ``"migrated"``) through :meth:`RunControl.set_status`.

Events go to the callbacks given to :meth:`RunControl.subscribe`, as
``callback(name, data)``, from whichever thread made them: ``STOP`` (the
pause took effect), ``RESUME``, ``SHUTDOWN`` (a run returned: ``data`` says
how, see :func:`exit_summary`), and ``MIGRATION`` from :mod:`pyvt.migration`.
A callback that raises is reported on stderr once and stays subscribed; the
VM goes on.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from . import exits
from .errors import ArgumentError, RunControlError

#: How often pause() and end_run() kick a vCPU that has not parked yet (s).
KICK_INTERVAL = 0.02

#: The statuses run control itself sets; migration adds its own.
STATUSES = ("created", "running", "paused", "shutdown")

EventCallback = Callable[[str, dict], None]


def exit_summary(exit) -> dict:
    """A JSON-friendly description of how a run ended: ``{"exit": class
    name, "description": repr}``, plus ``status`` and ``code`` for a
    debug-exit (the process status ``pyvt run`` exits with)."""
    summary = {"exit": type(exit).__name__, "description": exit.describe()}
    if isinstance(exit, exits.DebugExit):
        summary["code"] = exit.code
        summary["status"] = exit.status
    return summary


def of(vm) -> "RunControl":
    """``vm``'s run control, made on first use (dict.setdefault is atomic)."""
    control = vm.__dict__.get("_run_control_state")
    if control is None:
        control = vm.__dict__.setdefault("_run_control_state", RunControl())
    return control


class RunControl:
    """The state shared by ``vm.run()``'s vCPU threads and the threads that
    pause, resume or end it.  One per VM (:func:`of`)."""

    def __init__(self):
        self._cond = threading.Condition()
        self._status = "created"
        self._paused = False
        self._active = False      # a vm.run() is in progress
        self._finishing = False   # that run is ending: parked vCPUs leave
        self._closed = False
        self._has_run = False
        # The run's vCPUs: index -> (Vcpu, thread ident running it).
        self._members: Dict[int, Tuple[Any, int]] = {}
        self._parked: Set[int] = set()
        # vCPUs pause()/end_run() kicked: their next Stopped is ours, not a run's end.
        self._kicked: Set[int] = set()
        self._end_exit: Optional[exits.Exit] = None
        self._subscribers: List[EventCallback] = []
        self._reported: Set[int] = set()  # id() of callbacks whose failure was logged
        #: Open each vCPU's KVM stats fd before running it (a control socket
        #: reads them while the vCPUs run; see pyvt.boot._run_one).
        self.open_stats = False

    # -- status and events ---------------------------------------------------

    @property
    def status(self) -> str:
        return self._status

    def set_status(self, status: str) -> None:
        """For migration: ``"inmigrate"``, ``"migrated"``..."""
        if not isinstance(status, str) or not status:
            raise ArgumentError(f"a VM status is a non-empty string, not {status!r}")
        with self._cond:
            self._status = status

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def active(self) -> bool:
        return self._active

    def subscribe(self, callback: EventCallback) -> Callable[[], None]:
        if not callable(callback):
            raise ArgumentError(f"subscribe() takes a callable(name, data), not {callback!r}")
        with self._cond:
            self._subscribers.append(callback)

        def unsubscribe() -> None:
            with self._cond:
                if callback in self._subscribers:
                    self._subscribers.remove(callback)

        return unsubscribe

    def emit(self, name: str, data: Optional[dict] = None) -> None:
        with self._cond:
            subscribers = list(self._subscribers)
        for callback in subscribers:
            try:
                callback(name, dict(data or {}))
            except Exception as e:  # a subscriber's bug must not stop the VM
                if id(callback) not in self._reported:
                    self._reported.add(id(callback))
                    print(f"pyvt: event callback {callback!r} raised {type(e).__name__}: {e} "
                          f"(on {name}; further failures of it are not reported)",
                          file=sys.stderr, flush=True)

    # -- the controlling side ---------------------------------------------------

    def pause(self, timeout: Optional[float] = 10.0) -> None:
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                    or timeout < 0):
            raise ArgumentError(f"pause timeout is a number of seconds >= 0 or None, not {timeout!r}")
        me = threading.get_ident()
        with self._cond:
            if any(thread == me for _, thread in self._members.values()):
                raise RunControlError("vm.pause() was called from one of the VM's own vCPU "
                                      "threads (an I/O handler?): it would wait for itself; "
                                      "pause from another thread")
            newly = not self._paused
            self._paused = True
            if not self._active and newly:
                self._status = "paused"
        if not self._active:
            if newly:
                self.emit("STOP", {})
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._cond:
                waiting = [cpu for index, (cpu, _) in self._members.items()
                           if index not in self._parked]
                if not waiting or not self._active or self._finishing or not self._paused:
                    break
                self._kicked.update(cpu.index for cpu in waiting)
            for cpu in waiting:
                cpu.stop()
            with self._cond:
                self._cond.wait(KICK_INTERVAL)
            if deadline is not None and time.monotonic() >= deadline:
                names = ", ".join(str(cpu.index) for cpu in waiting)
                if newly:  # undo this pause only, never an earlier one
                    self.resume(quiet=True)
                raise RunControlError(f"vm.pause(): vCPU(s) {names} did not stop within "
                                      f"{timeout:g} s (a Python I/O handler that does not "
                                      "return?); the VM runs on")
        with self._cond:
            announce = newly and self._paused
            if announce and self._active and not self._finishing:
                self._status = "paused"
        if announce:
            self.emit("STOP", {})

    def resume(self, quiet: bool = False) -> None:
        with self._cond:
            if not self._paused:
                return
            self._paused = False
            if self._status == "paused":
                self._status = "running" if self._active else self._idle_status
            self._cond.notify_all()
        if not quiet:
            self.emit("RESUME", {})

    @property
    def _idle_status(self) -> str:
        return "shutdown" if self._has_run else "created"

    def end_run(self, exit) -> None:
        if not isinstance(exit, exits.Exit):
            raise ArgumentError(f"end_run() takes an exit (a pyvt.exits value), not {exit!r}")
        with self._cond:
            self._end_exit = exit
            self._finishing = self._active
            self._cond.notify_all()
            if not self._active:
                return
        me = threading.get_ident()
        while True:
            with self._cond:
                running = [(cpu, thread) for index, (cpu, thread) in self._members.items()
                           if index not in self._parked]
                self._kicked.update(cpu.index for cpu, _ in running)
            for cpu, _ in running:
                cpu.stop()  # the caller's own vCPU too (from a handler): its run ends next
            # Wait for the others to leave KVM_RUN; never for this thread.
            if not any(thread != me for _, thread in running) or not self._active:
                return
            with self._cond:
                self._cond.wait(KICK_INTERVAL)

    def close(self) -> None:
        """The VM is closing: parked vCPUs leave their run."""
        with self._cond:
            self._closed = True
            self._finishing = True
            self._cond.notify_all()

    # -- the run's side (pyvt.boot) ------------------------------------------------

    def run_started(self) -> Optional[exits.Exit]:
        """A vm.run() begins.  Returns the exit end_run() left for it (the
        run must return it at once), else None."""
        with self._cond:
            if self._active:
                raise RunControlError("vm.run() is already running in another thread")
            if self._end_exit is not None:
                return self._end_exit
            self._active = True
            self._has_run = True
            self._finishing = False
            self._members.clear()
            self._parked.clear()
            self._kicked.clear()
            self._status = "paused" if self._paused else "running"
        return None

    def run_finished(self, exit: Any, error: Optional[BaseException] = None) -> Any:
        """The run returns ``exit`` (or raised ``error``): what it returns
        instead if end_run() asked for another exit."""
        with self._cond:
            ended, self._end_exit = self._end_exit, None
            if ended is not None:
                exit = ended
            self._active = False
            self._finishing = False
            self._members.clear()
            self._parked.clear()
            self._kicked.clear()
            if self._status in ("running", "paused", "created"):
                self._status = "shutdown"
            self._cond.notify_all()
        if ended is not None or error is None:
            self.emit("SHUTDOWN", exit_summary(exit))
        else:
            self.emit("SHUTDOWN", {"exit": None, "error": f"{type(error).__name__}: {error}"})
        return exit

    def finishing(self) -> None:
        """One vCPU's exit ends the run: the parked ones must leave too."""
        with self._cond:
            self._finishing = True
            self._cond.notify_all()

    @property
    def ending(self) -> bool:
        return self._finishing

    def join(self, cpu) -> None:
        with self._cond:
            self._members[cpu.index] = (cpu, threading.get_ident())

    def leave(self, cpu) -> None:
        with self._cond:
            self._members.pop(cpu.index, None)
            self._parked.discard(cpu.index)
            self._cond.notify_all()

    def claims_stop(self, cpu) -> bool:
        """True if the Stopped exit ``cpu`` just got came from pause() or
        end_run(): its run goes on (to park, or to leave)."""
        with self._cond:
            kicked = cpu.index in self._kicked
            self._kicked.discard(cpu.index)
            return kicked or self._paused or self._finishing

    def hold(self, cpu) -> float:
        """Called by ``cpu``'s run thread before each KVM_RUN: parks it while
        the VM is paused.  Returns the seconds it was parked."""
        with self._cond:
            if not self._paused or self._finishing:
                self._kicked.discard(cpu.index)
                return 0.0
        started = time.monotonic()
        # Complete the write the last exit left pending (the guest made it),
        # as a snapshot does, before the pausing thread looks at the state.
        if cpu._run_lock.acquire(blocking=False):
            try:
                cpu._settle_for_snapshot()
            finally:
                cpu._run_lock.release()
        with self._cond:
            self._parked.add(cpu.index)
            self._cond.notify_all()
            try:
                while self._paused and not self._finishing:
                    self._cond.wait(0.1)  # a timeout: Ctrl-C gets through on the main thread
            finally:
                self._parked.discard(cpu.index)
                self._kicked.discard(cpu.index)
        return time.monotonic() - started


__all__ = ["RunControl", "exit_summary", "STATUSES", "of"]
