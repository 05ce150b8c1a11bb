"""A virtual CPU of a :class:`pyvt.Vm`: registers, CPUID, MSRs and the run loop."""

from __future__ import annotations

import collections
import contextlib
import errno
import functools
import math
import signal
import threading
from typing import Dict, Iterable, List, Mapping, Optional, Tuple

from . import _native, debugging, exits, guest_exceptions, modes, vcpu_state
from ._kvm import ffi, lib
from .errors import (
    ArgumentError,
    BackendError,
    ClosedError,
    Error,
    KvmError,
    OutOfRangeError,
    SnapshotError,
    UnmappedAddressError,
)
from .kvm import PAGE_SIZE, CpuidEntry, caps, msrs_struct
from .kvm_stats import CachedStats, StatsDescriptor, StatValue
from .registers import (
    FPU_FIELDS,
    GENERAL_FIELDS,
    FpuView,
    Registers,
    RegisterView,
    SpecialRegisterView,
)
from .vcpu_state import VcpuState

#: While a guest runs on the main thread, it is kicked this often (seconds) so
#: that Ctrl-C is noticed even if the guest never exits.
MAIN_THREAD_TICK = 0.05

_SREGS_SIZE = ffi.sizeof("struct kvm_sregs")
_EVENTS_SIZE = ffi.sizeof("struct kvm_vcpu_events")
_REGS_SIZE = ffi.sizeof("struct kvm_regs")
#: kvm_sregs and kvm_sregs2 share their first bytes, CS and EFER among them.
_SREGS_COMMON_SIZE = ffi.offsetof("struct kvm_sregs", "interrupt_bitmap")
assert _SREGS_SIZE % 8 == 0

_DIRECTIONS = {lib.KVM_EXIT_IO_IN: "in", lib.KVM_EXIT_IO_OUT: "out"}

#: The run loop's own counters (pyvt._native.VcpuLoop.stats), all plain
#: event counts: part of ``Vcpu.stats`` and, summed, of ``Vm.stats``.
RUN_LOOP_COUNTERS = ("kvm_exits", "native_exits", "python_exits", "coalesced_writes",
                     "dirty_ring_full_exits")

#: The run loop's measures that are not plain counts, with what they are:
#: ``guest_time_ns``, the time spent inside KVM_RUN (the guest ran, or KVM
#: worked for it), and ``exits_by_reason``, ``{reason name: count}`` of the
#: KVM_RUN returns (names from ``KVM_EXIT_*``, lower case: ``io``, ``mmio``,
#: ``hlt``, ``intr``...; only reasons seen).  Summed, they are in ``Vm.stats``.
RUN_LOOP_MEASURES: Dict[str, StatsDescriptor] = {
    "guest_time_ns": StatsDescriptor("guest_time_ns", "cumulative", "seconds", 10, -9),
    "exits_by_reason": StatsDescriptor("exits_by_reason"),
}

#: Every key pyvt's run loop puts in ``Vcpu.stats``.
RUN_LOOP_STATS = RUN_LOOP_COUNTERS + tuple(RUN_LOOP_MEASURES)

#: ``kvm_run.exit_reason`` -> its name in ``exits_by_reason``, from
#: <linux/kvm.h> (``KVM_EXIT_IO_IN``/``_OUT`` are I/O directions, not reasons).
EXIT_REASON_NAMES: Dict[int, str] = {
    getattr(lib, name): name[len("KVM_EXIT_"):].lower() for name in dir(lib)
    if name.startswith("KVM_EXIT_") and name not in ("KVM_EXIT_IO_IN", "KVM_EXIT_IO_OUT")}


def exit_reason_name(reason: int) -> str:
    """``exits_by_reason``'s name for exit reason ``reason``: ``reason_<n>``
    for one <linux/kvm.h> did not name when pyvt was built; the run loop's
    last slot counts every reason from ``_native.EXIT_REASON_SLOTS - 1`` on."""
    name = EXIT_REASON_NAMES.get(reason)
    if name is not None:
        return name
    if reason >= _native.EXIT_REASON_SLOTS - 1:
        return f"reason_{_native.EXIT_REASON_SLOTS - 1}_or_more"
    return f"reason_{reason}"


class Vcpu:
    """One vCPU.  Made by :meth:`pyvt.Vm.vcpu`, not directly.

    ``regs``/``sregs``/``fpu`` read and write through to the vCPU;
    ``run()`` runs it until something needs the caller.
    """

    def __init__(self, vm, index: int, mode: str, setup: bool = True, ring: int = 0):
        self._vm = vm
        self.index = index
        self.mode = modes.check_mode(mode)
        #: The privilege level the vCPU started at (``vm.vcpu(..., ring=3)``).
        self.ring = modes.check_ring(ring, mode)
        self.last_exit: Optional[exits.AnyExit] = None
        self._run_lock = threading.Lock()
        # The thread that holds _run_lock through paused(), if any.
        self._paused_by: Optional[int] = None
        # Guards _running_thread against stop(): a stop() is for the run in
        # progress, never for the next one.
        self._stop_lock = threading.Lock()
        self._running_thread: Optional[int] = None
        self._close_pending = False
        self._loop: Optional[_native.VcpuLoop] = None
        # Vectors interrupt() queued until the guest can take them (no irqchip).
        self._queued_vectors: collections.deque = collections.deque()
        self._vector_handed_over = False
        self._window_requested = False
        # What lets restore_state() skip writes (see its docstring): the
        # fingerprint (vcpu_state.fingerprint) of the VcpuState whose values
        # KVM holds for this vCPU since restore_state() wrote it or
        # save_state() read it, or None once anything may have changed it
        # but a run; and whether the vCPU has run since.
        self._held: Optional[tuple] = None
        self._held_writes = 0  # self.fd.writes when _held was taken
        # (KVM_RUN count, exit's linear RIP, 64-bit, CS base): a port write
        # left pending by a restore (see _defer_port_write), or None.
        self._deferred_out: Optional[tuple] = None
        self._ran_since_held = False
        # Checked before KVM_CREATE_VCPU: KVM cannot create an index twice.
        if setup:
            modes.write_setup_area(vm.memory, mode, ring, guest_exceptions.EXCEPTION_PORT)
        self.fd = vm.fd.create_vcpu(index)
        self._kvm_stats = CachedStats(self.fd, vm.kvm, f"vCPU {index}", RUN_LOOP_COUNTERS)
        try:
            self._setup(vm, mode, setup)
        except BaseException:
            self.fd.close()
            raise

    def _setup(self, vm, mode: str, setup: bool) -> None:
        """setup=False leaves CPUID and registers to the caller (clones)."""
        run = self.fd.run_struct
        # With KVM_CAP_SYNC_REGS the general registers travel in the kvm_run
        # page on every exit, so reading RIP costs no ioctl.  Mode setup
        # defines every register that matters, so the page starts from zeros
        # instead of a KVM_GET_REGS.
        self._sync_regs = bool(vm.kvm.check_extension("KVM_CAP_SYNC_REGS")
                               & lib.KVM_SYNC_X86_REGS)
        self._regs_stale = not self._sync_regs
        self._regs = None
        self._sregs = None
        if self._sync_regs:
            run.kvm_valid_regs = lib.KVM_SYNC_X86_REGS
        if setup:
            self._set_initial_cpuid(vm)
            sregs = self.fd.get_sregs()
            ffi.buffer(sregs)[:] = _mode_sregs(mode, self.ring, bytes(ffi.buffer(sregs)))
            self.fd.set_sregs(sregs)
            regs = self._load_regs()
            modes.apply_regs(mode, regs, self.ring)
            self._store_regs(regs)

        self._loop = _native.VcpuLoop(
            vm._machine, self.fd.fileno(), self.fd.run_page,
            self.fd.coalesced_ring_offset if vm._coalescing else 0, PAGE_SIZE)
        if vm.fd.dirty_ring_size:  # a full ring is emptied on the way (pyvt.dirty_pages)
            self._loop.on_dirty_ring_full = functools.partial(
                vm.memory.harvest_dirty_rings, self.fd.dirty_ring())
        settle = self._settle_pending_io
        self._regs_view = RegisterView(self._load_regs, self._store_regs, GENERAL_FIELDS, settle)
        self._sregs_view = SpecialRegisterView(self._load_sregs, self._store_sregs, settle)
        self._fpu_view = FpuView(self._load_fpu, self._store_fpu, FPU_FIELDS, settle)

    def _set_initial_cpuid(self, vm) -> None:
        """KVM_SET_CPUID2 from the supported CPUID, with this vCPU's APIC ID."""
        try:
            table = _initial_cpuid_table(vm.kvm, self.index)
        except KvmError:
            return  # a backend without a CPUID table answers CPUID itself
        self.fd.set_cpuid2_table(table)

    def __repr__(self) -> str:
        state = "closed" if self.closed else self.mode
        return f"<Vcpu {self.index} ({state})>"

    # -- registers ---------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self.fd.closed

    def _check_open(self) -> None:
        if self.fd.closed:
            raise ClosedError(f"vCPU {self.index} is closed (its VM was closed)")

    def _load_regs(self):
        self._check_open()
        if self._sync_regs:
            return self.fd.run_struct.s.regs.regs
        if self._regs_stale:
            self._regs = self.fd.get_regs()
            self._regs_stale = False
        return self._regs[0]

    def _store_regs(self, regs) -> None:
        if self._sync_regs:
            # KVM loads them from the run page on the next KVM_RUN.
            self.fd.run_struct.kvm_dirty_regs |= lib.KVM_SYNC_X86_REGS
            return
        try:
            self.fd.set_regs(ffi.addressof(regs))
        except BaseException:
            self._regs_stale = True  # the cached copy holds what was refused
            raise

    def _load_sregs(self):
        self._check_open()
        if self._sregs is None:
            self._sregs = self.fd.get_sregs()
        return self._sregs[0]

    def _store_sregs(self, sregs) -> None:
        try:
            self.fd.set_sregs(ffi.addressof(sregs))
        except BaseException:
            self._sregs = None  # the cached copy holds what was refused
            raise

    def _load_fpu(self):
        self._check_open()
        self._fpu = self.fd.get_fpu()
        return self._fpu[0]

    def _store_fpu(self, fpu) -> None:
        self.fd.set_fpu(ffi.addressof(fpu))

    @property
    def regs(self) -> RegisterView:
        """General registers: ``cpu.regs.rip = 0x1000``; ``cpu.regs.rax``."""
        self._check_open()
        return self._regs_view

    @property
    def sregs(self) -> SpecialRegisterView:
        """Special registers: ``cpu.sregs.cr0``, ``cpu.sregs.cs.base``..."""
        self._check_open()
        return self._sregs_view

    @property
    def fpu(self) -> FpuView:
        """FPU/SSE state (``KVM_GET_FPU``/``KVM_SET_FPU``)."""
        self._check_open()
        return self._fpu_view

    def get_msrs(self, indices: Iterable[int]) -> Dict[int, int]:
        """Reads MSRs (``KVM_GET_MSRS``): ``{index: value}``."""
        self._check_open()
        return self.fd.get_msrs(indices)

    def set_msrs(self, values: Mapping[int, int]) -> None:
        """Writes MSRs (``KVM_SET_MSRS``) from ``{index: value}``."""
        self._check_open()
        if not isinstance(values, Mapping):
            raise ArgumentError("set_msrs takes a mapping {index: value}")
        self._settle_pending_io()
        self.fd.set_msrs(values)

    @property
    def cpuid(self) -> List[CpuidEntry]:
        """The CPUID table the guest sees (``KVM_GET_CPUID2``); assign a list
        of :class:`pyvt.kvm.CpuidEntry` to change it before the first run."""
        self._check_open()
        return self.fd.get_cpuid2()

    @cpuid.setter
    def cpuid(self, entries: Iterable[CpuidEntry]) -> None:
        self._check_open()
        self._settle_pending_io()
        self.fd.set_cpuid2(list(entries))

    # -- state -------------------------------------------------------------

    def save_state(self) -> VcpuState:
        """This vCPU's whole architectural state (:class:`pyvt.vcpu_state.VcpuState`:
        registers, XSAVE area, MSRs with the TSC, LAPIC, events...), as
        :meth:`pyvt.Vm.snapshot` keeps it.  A pending port or MMIO write is
        completed first (the guest has made it); a pending read stays
        pending (restoring runs the instruction again).  The vCPU must not
        be running: this raises :class:`pyvt.Error` if it is."""
        with self._stopped():
            self._settle_for_snapshot()
            state = vcpu_state.read(self.fd, self._load_regs(), self.index, self.mode,
                                    self.ring)
            self._hold(state)
            return state

    def restore_state(self, state: VcpuState, user_mode_only: bool = False) -> None:
        """Puts back a state :meth:`save_state` returned (of this vCPU, or of
        one of another VM with the same CPUID), in the order
        :func:`pyvt.vcpu_state.write` documents.  A pending access is
        abandoned first.  The vCPU must not be running.

        It writes only what may differ.  If this vCPU holds ``state`` already
        (the last restore_state() wrote it, or save_state() returned it, and
        neither a run nor a write through this object's ``regs``/``sregs``/
        ``fpu``/``set_msrs``/``cpuid``/``interrupt``/``nmi`` came since),
        that is the general registers and the TSC, which counts on while the
        vCPU waits (with the in-kernel irqchip also the LAPIC, MSRs, events
        and MP state, which interrupts and timers change without a run).
        ``user_mode_only=True`` is the caller's promise that every run since
        then executed CPL-3 code only (no exception, interrupt or system
        call reached CPL 0, nor any pyvt stub); then the general and segment
        registers, the XSAVE/FPU state and the events are written, and the
        TSC is not: it keeps counting.  A write through ``cpu.fd`` since
        (any ioctl but a read: ``VcpuFd.writes``) makes the restore whole."""
        if self._paused_by == threading.get_ident():
            # Within paused() (vm.restore): _stopped()'s own shortcut, without
            # the cost of a generator in a restore loop.
            self._check_open()
            self._restore_state(state, user_mode_only)
            return
        with self._stopped():
            self._restore_state(state, user_mode_only)

    def _restore_state(self, state: VcpuState, user_mode_only: bool) -> None:
        """restore_state() once the vCPU is held stopped."""
        self._abandon_pending_io(state)
        held = (self._held is not None and self.fd.writes == self._held_writes
                and vcpu_state.unchanged(self._held, state))
        if held and not self._ran_since_held and not self._vm.fd.has_irqchip:
            self._put_regs(state.regs)
            self._write_tsc(state)
        elif held and user_mode_only and not self._vm.fd.has_irqchip:
            self._restore_user_mode(state)
        else:
            self._held = None
            self._write_state(state)
        if held:
            self._ran_since_held = False  # the fingerprint still holds
            self._held_writes = self.fd.writes  # counting what it just wrote
        else:
            self._hold(state)
        self._sregs = None
        self.mode = state.mode
        self.ring = state.ring
        self.last_exit = None

    def _write_state(self, state: VcpuState) -> None:
        """vcpu_state.write(state): where the registers travel in the run
        page, its ioctls in one native call (_state_batch).  If KVM refuses
        one, vcpu_state.write runs it all again, and reports the refusal or
        learns which MSRs KVM does not take back."""
        batch = _state_batch(self.fd, state) if self._sync_regs else None
        if batch is not None:
            self._put_regs(state.regs)
            done, error = batch.write(self.fd.fileno())
            self.fd.writes += done + (1 if error else 0)
            if not error:
                return
        vcpu_state.write(self.fd, state, self._put_regs)

    def _write_tsc(self, state: VcpuState) -> None:
        """vcpu_state.write_tsc(state), as a native batch of one kept with
        the state; if KVM refuses it, vcpu_state.write_tsc reports why."""
        value = state.msrs.get(vcpu_state.MSR_IA32_TSC)
        if value is None:
            return
        cached = state._structs.get("tsc batch")
        if cached is None or cached[0] != value:
            block = msrs_struct({vcpu_state.MSR_IA32_TSC: value})
            cached = (value, _native.StateWrites([(lib.KVM_SET_MSRS, _address(block), 1)]), block)
            state._structs["tsc batch"] = cached
        done, error = cached[1].write(self.fd.fileno())
        self.fd.writes += done + (1 if error else 0)
        if error:
            vcpu_state.write_tsc(self.fd, state)

    def _restore_user_mode(self, state: VcpuState) -> None:
        """vcpu_state.write_user_mode(state), in one native call where the
        registers travel in the run page (_native.restore_user_mode)."""
        loop = self._loop
        plan = _user_mode_plan(self.fd, state) if self._sync_regs else None
        if plan is None or loop is None:
            vcpu_state.write_user_mode(self.fd, state, self._put_regs,
                                       *self._synced_sregs_and_events())
            return
        synced = (self.fd.run_struct.kvm_valid_regs & _SYNCED_USER_MODE == _SYNCED_USER_MODE
                  and self._ran_since_held)
        writes, error, ioctl = _native.restore_user_mode(loop, *plan, synced)
        self.fd.writes += writes
        if error:
            raise KvmError(ioctl or "KVM_SET_*", error,
                           f"vCPU {self.index}: restoring its user-mode state")

    def _hold(self, state: VcpuState) -> None:
        self._held = vcpu_state.fingerprint(state)
        self._held_writes = self.fd.writes
        self._ran_since_held = False

    def track_user_mode_state(self) -> None:
        """Has KVM copy this vCPU's segment registers and events into the
        run page at each exit (KVM_SYNC_X86_SREGS and _EVENTS, where the
        backend offers them), so that ``restore_state(...,
        user_mode_only=True)`` skips writing those that did not change.
        Costs a little on every exit: for vCPUs whose runs are mostly
        calls (pyvt.Sandbox)."""
        self._check_open()
        wanted = lib.KVM_SYNC_X86_SREGS | lib.KVM_SYNC_X86_EVENTS
        if self._sync_regs and self._vm.kvm.check_extension("KVM_CAP_SYNC_REGS") & wanted \
                == wanted:
            self.fd.run_struct.kvm_valid_regs |= wanted

    def _synced_sregs_and_events(self):
        """(sregs, events) as bytes from the run page, where KVM wrote them
        at the last exit (track_user_mode_state); (None, None) otherwise."""
        run = self.fd.run_struct
        wanted = lib.KVM_SYNC_X86_SREGS | lib.KVM_SYNC_X86_EVENTS
        if run.kvm_valid_regs & wanted != wanted or not self._ran_since_held:
            return None, None
        sregs = ffi.addressof(run.s.regs.sregs)
        # struct kvm_sync_regs: regs, sregs, then events (the cffi
        # declaration stops at sregs; kvm_sregs's size keeps 8-byte alignment).
        events = ffi.cast("char *", sregs) + _SREGS_SIZE
        return bytes(ffi.buffer(sregs)), bytes(ffi.buffer(events, _EVENTS_SIZE))

    def _put_regs(self, data: bytes) -> None:
        if self._sync_regs:
            # The run page's registers as a buffer, kept with the run page it
            # is of (a closed vCPU's is None: never a stale buffer).
            run = self.fd.run_struct
            cached = self.__dict__.get("_run_regs")
            if cached is None or cached[0] is not run:
                cached = self._run_regs = (run, ffi.buffer(ffi.addressof(run.s.regs.regs)))
            cached[1][:] = data
            run.kvm_dirty_regs |= lib.KVM_SYNC_X86_REGS  # as _store_regs
            return
        regs = ffi.new("struct kvm_regs *")
        ffi.buffer(regs)[:] = data
        self._regs_stale = True
        self.fd.set_regs(regs)

    @contextlib.contextmanager
    def _stopped(self):
        """Holds the run lock for a state access, unless this thread holds
        it already through :func:`paused`."""
        self._check_open()
        if self._paused_by == threading.get_ident():
            yield
            return
        if not self._run_lock.acquire(blocking=False):
            raise Error(f"vCPU {self.index} is running: stop it (cpu.stop()) before saving "
                        "or restoring its state")
        try:
            yield
        finally:
            self._run_lock.release()

    # -- running -----------------------------------------------------------

    def run(self, timeout: Optional[float] = None, check: bool = False) -> exits.AnyExit:
        """Runs the vCPU until something needs the caller; returns the exit.

        Port I/O and MMIO claimed by native devices or by handlers registered
        with ``vm.on_io``/``vm.on_mmio``, and MSRs with a ``vm.on_msr``
        handler, are served without returning.
        ``timeout`` (seconds; None or ``inf``: no limit) stops a guest that
        runs too long and returns :class:`pyvt.exits.Timeout`; the vCPU can
        be run again.  A handler's exception and Ctrl-C propagate out of
        here, and the VM stays usable: a read whose handler raised is
        abandoned, so the guest retries it on the next run; a write is not
        made twice (the guest goes on after it).  A run() while
        another thread takes a snapshot or restores one waits for it.
        ``check=True`` raises :class:`pyvt.GuestError` for failure exits.
        """
        stop = self._run_until_stop(timeout)
        if stop is None:
            return exits.Stopped(None)
        return self._exit_of(stop, timeout, check)

    def _run_until_stop(self, timeout: Optional[float],
                        runner=None) -> Optional[Tuple[int, int, int]]:
        """run() without making the exit: the native loop's ``(stop, code,
        port)``, or None if the VM was closed meanwhile.  A caller that
        recognises the stop itself (pyvt.Sandbox: its trampoline's exit)
        skips _exit_of, and last_exit stays as it was.  ``runner``: what
        runs the loop instead of its own run(seconds, tick) (pyvt.Sandbox's
        _native.SandboxCalls.run, which may return its own stops)."""
        self._check_open()
        seconds = _timeout_seconds(timeout)
        self._acquire_run_lock()
        try:
            tick = MAIN_THREAD_TICK if threading.current_thread() is threading.main_thread() else 0.0
            self._sregs = None
            self._regs_stale = True
            self._ran_since_held = True
            loop = self._loop
            if loop is None:
                raise ClosedError(f"vCPU {self.index} is closed (its VM was closed)")
            with self._stop_lock:
                self._running_thread = threading.get_ident()
            stop, code, port = (runner or loop.run)(seconds, tick)
            while self._offer_queued_vector(stop):  # the interrupt window opened
                stop, code, port = loop.run(seconds, tick)
        finally:
            with self._stop_lock:
                self._running_thread = None
                if self._loop is not None:
                    self._loop.clear_stop()
            self._run_lock.release()
            if self._close_pending:  # the VM was closed from a handler
                self._close()
        if self.fd.closed:
            return None
        return stop, code, port

    def _exit_of(self, stop: Tuple[int, int, int], timeout: Optional[float],
                 check: bool = False) -> exits.AnyExit:
        """The exit a stop of _run_until_stop means (and last_exit)."""
        exit = self._decode(*stop, timeout)
        self.last_exit = exit
        if check:
            exit.raise_for_failure()
        return exit

    def step(self, timeout: Optional[float] = None) -> exits.AnyExit:
        """Runs one instruction (``KVM_SET_GUEST_DEBUG`` single step) and
        returns the exit: :class:`pyvt.exits.Debug` with ``step=True`` after
        it, or whatever exit the instruction made (``Hlt``, an I/O nobody
        handles...).  A software breakpoint at rip is stepped over; the
        VM's breakpoints and watchpoints are back in force afterwards."""
        self._check_open()
        return debugging.debugger(self._vm).step(self, timeout)

    def _acquire_run_lock(self) -> None:
        if self._run_lock.acquire(blocking=False):
            return
        # A snapshot or restore in another thread holds every vCPU while it
        # copies state: wait for it (it holds the VM's pause lock throughout).
        with self._vm._pause_lock:
            if self._run_lock.acquire(blocking=False):
                return
        raise Error(f"vCPU {self.index} is already running in another thread")

    def stop(self) -> None:
        """Makes a ``run()`` in another thread return :class:`pyvt.exits.Stopped`
        soon; does nothing if the vCPU is not running (the next run() runs)."""
        with self._stop_lock:
            thread = self._running_thread
            if thread is None or self._loop is None:
                return
            self._loop.request_stop()
            try:
                signal.pthread_kill(thread, _native.KICK_SIGNAL)
            except (ProcessLookupError, OSError):
                pass

    # -- the access the last exit left pending (csrc/io_completion.h) ------

    def _settle_pending_io(self) -> None:
        """Completes a pending I/O access now (a read with its reply, or all
        ones), so that a register write made next is not undone by it."""
        if self._loop is not None and self._loop.pending_io is not None:
            self._settle(self._loop.finish_io)

    def _abandon_pending_io(self, then: Optional[VcpuState] = None) -> None:
        """Drops a pending read (the registers stay as at the exit, so the
        instruction runs again) or retires a pending write: before a restore
        overwrites the state, nothing may complete on top of it.  ``then``:
        the state the caller writes next; a port write that cannot act on it
        stays pending (see _defer_port_write), saving a KVM_RUN."""
        if self._loop is not None and self._loop.pending_io is not None:
            mode = None if then is None else _entry_mode(then)
            if mode is not None and self._defer_port_write(mode):
                return
            self._settle(self._loop.abandon_io)

    # A port write left pending across a restore or a register write.  What
    # KVM's completion of an OUT does on the next KVM_RUN: after an emulated
    # OUT, nothing (RIP moved past it before the exit); after a fast one
    # (complete_fast_pio_out), it skips the instruction only if the linear
    # RIP is still the OUT's (cui_linear_rip; a register write to another
    # RIP cancels it, which is what the raw-C loop of benchmarks/sandbox.py
    # relies on).  So where the RIP written next is not within an
    # instruction's length before the exit's RIP, the completion changes
    # nothing, and the KVM_RUN that retires it now can be left to the next
    # run.  The write stays pending for pyvt (a snapshot, reply() or
    # register write settles it as before); _deferred_out records the
    # exit's linear RIP and the CS mode the vCPU holds now, valid while the
    # run loop counts no further KVM_RUN.

    def _defer_port_write(self, mode: Tuple[bool, int, int]) -> bool:
        """True if the pending access is a port write that cannot act on a
        vCPU entered at ``mode`` (_entry_mode: 64-bit, CS base, RIP), which
        the caller writes next; it stays pending (recorded with ``mode``)."""
        loop = self._loop
        exit_rip = None if loop is None else self._pending_out_rip(loop)
        if loop is None or exit_rip is None or _near_out(exit_rip, _linear_rip(*mode)):
            return False
        self._deferred_out = (_native.kvm_runs(loop), exit_rip, mode[0], mode[1])
        return True

    def _pending_out_rip(self, loop: _native.VcpuLoop) -> Optional[int]:
        """The exit's linear RIP if the pending access is a port write and
        that RIP is known (recorded, or in the run page: KVM_SYNC_X86_REGS
        and _SREGS from the exit, not overwritten since); else None."""
        if loop.pending_io != "write":
            return None
        deferred = self._deferred_out
        if deferred is not None and deferred[0] == _native.kvm_runs(loop):
            return deferred[1]
        self._deferred_out = None
        run = self.fd.run_struct
        if (run.exit_reason != lib.KVM_EXIT_IO or run.io.direction != lib.KVM_EXIT_IO_OUT
                or run.kvm_valid_regs & _SYNCED_AT_EXIT != _SYNCED_AT_EXIT
                or run.kvm_dirty_regs & _SYNCED_AT_EXIT):
            return None
        sregs = run.s.regs.sregs
        return _linear_rip(_is_64_bit(sregs.efer, sregs.cs.l), sregs.cs.base,
                           run.s.regs.regs.rip)

    def _enter(self, rip: int, values: Mapping[str, int]) -> None:
        """Sets RIP and general registers ``values`` (valid register names
        and 64-bit values) for an entry at ``rip``, as ``cpu.regs`` writes
        do, except that a deferred port write (see _defer_port_write) that
        cannot act at ``rip`` stays deferred."""
        deferred, loop = self._deferred_out, self._loop
        if (deferred is None or loop is None or deferred[0] != _native.kvm_runs(loop)
                or _near_out(deferred[1], _linear_rip(deferred[2], deferred[3], rip))):
            self._settle_pending_io()
        regs = self._load_regs()
        regs.rip = rip
        for name, value in values.items():
            setattr(regs, name, value)
        self._store_regs(regs)

    def _settle_for_snapshot(self) -> None:
        """A snapshot starts after a pending write (the guest has done it)
        and before a pending read (not answered yet: restoring or cloning
        runs the instruction again, and reply() still reaches this vCPU)."""
        if self._loop is not None and self._loop.pending_io == "write":
            self._settle(self._loop.finish_io)

    def _settle(self, step) -> None:
        """Runs ``step`` (the loop's finish_io or abandon_io), which enters
        KVM_RUN: the registers cached here are stale afterwards, even if it
        raised."""
        try:
            step(f"vCPU {self.index}")
        finally:
            self._regs_stale = True
            self._sregs = None
            self._ran_since_held = True

    def _rip(self) -> Optional[int]:
        try:
            return self._load_regs().rip
        except Error:
            return None

    def _decode(self, stop: int, code: int, port: int, timeout) -> exits.AnyExit:
        if stop == _native.STOP_TIMEOUT:
            return exits.Timeout(float(timeout), self._rip())
        if stop == _native.STOP_REQUESTED:
            return exits.Stopped(self._rip())
        if stop == _native.STOP_ERROR:
            raise KvmError("KVM_RUN", code, f"vCPU {self.index} could not run")
        if stop == _native.STOP_BAD_EXIT:
            io = self.fd.run_struct.io
            raise BackendError(
                f"{self._vm.backend} reported a port-I/O exit whose data lies outside the "
                f"vCPU mapping (data_offset={io.data_offset:#x}, size={io.size}, "
                f"count={io.count}): a bug in that backend; the exit was not handled")
        if stop == _native.STOP_DEVICE:
            return self._vm._device_exit(code, port, self)
        return self._decode_kvm_exit()

    def _decode_kvm_exit(self) -> exits.AnyExit:
        run = self.fd.run_struct
        reason = run.exit_reason
        rip = self._rip()
        if reason == lib.KVM_EXIT_IO:
            io = run.io
            data = b""
            if io.direction == lib.KVM_EXIT_IO_OUT:
                data = bytes(ffi.buffer(ffi.cast("char *", run) + io.data_offset,
                                        io.size * io.count))
            return exits.Io(io.port, io.size, _DIRECTIONS.get(io.direction, "?"), data,
                            io.count, rip)
        if reason == lib.KVM_EXIT_MMIO:
            mmio = run.mmio
            size = min(mmio.len, 8)
            data = bytes(mmio.data[0:size]) if mmio.is_write else b""
            return exits.Mmio(mmio.phys_addr, mmio.len, bool(mmio.is_write), data, rip)
        if reason in (lib.KVM_EXIT_X86_RDMSR, lib.KVM_EXIT_X86_WRMSR):
            msr = run.msr
            is_write = reason == lib.KVM_EXIT_X86_WRMSR
            return exits.Msr(msr.index, is_write, msr.data if is_write else None, msr.reason, rip)
        if reason == lib.KVM_EXIT_HLT:
            return exits.Hlt(rip)
        if reason == lib.KVM_EXIT_SHUTDOWN:
            return exits.Shutdown(self._snapshot_regs(), rip,
                                  **debugging.fault_context(self, rip))
        if reason == lib.KVM_EXIT_FAIL_ENTRY:
            return exits.FailEntry(run.fail_entry.hardware_entry_failure_reason,
                                   run.fail_entry.cpu, self._snapshot_regs(), rip)
        if reason == lib.KVM_EXIT_INTERNAL_ERROR:
            return self._internal_error(run, rip)
        if reason == lib.KVM_EXIT_DEBUG:
            arch = run.debug.arch
            return debugging.explain(
                self, exits.Debug(arch.exception, arch.pc, arch.dr6, arch.dr7, rip))
        if reason == lib.KVM_EXIT_EXCEPTION:
            instruction, disassembly = debugging.instruction_at(self, rip)
            cr2 = self.sregs.cr2 if run.ex.exception == 14 else None
            return exits.GuestException(run.ex.exception, run.ex.error_code, rip, cr2,
                                        instruction, disassembly)
        if reason == lib.KVM_EXIT_SYSTEM_EVENT:
            return exits.SystemEvent(run.system_event.type, rip)
        if reason == lib.KVM_EXIT_HYPERCALL:
            return exits.Hypercall(run.hypercall.nr, tuple(run.hypercall.args), rip)
        return exits.Unhandled(reason, run.hw.hardware_exit_reason, rip)

    def _snapshot_regs(self) -> Optional[Registers]:
        try:
            return Registers.from_struct(self._load_regs())
        except Error:
            return None

    def _internal_error(self, run, rip) -> exits.InternalError:
        internal = run.internal
        ndata = min(internal.ndata, 16)
        data = tuple(internal.data[i] for i in range(ndata))
        instruction = b""
        failure = run.emulation_failure
        if (internal.suberror == lib.KVM_INTERNAL_ERROR_EMULATION
                and failure.flags & lib.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES):
            instruction = bytes(failure.insn_bytes[0:min(failure.insn_size, 15)])
        bits = 64
        try:
            sregs = self.fd.get_sregs()
            bits = 64 if sregs.cs.l else 32 if sregs.cs.db else 16
            if not instruction and rip is not None:
                # pyvt's modes map memory 1:1, so the linear address is physical.
                instruction = self._vm.memory.read(sregs.cs.base + rip, 15)
        except (Error, OutOfRangeError):
            pass
        return exits.InternalError(internal.suberror, data, instruction,
                                   disassemble(instruction, rip or 0, bits),
                                   self._snapshot_regs(), rip)

    def reply(self, value) -> None:
        """Answers the read that the last exit (an unclaimed ``Io`` in,
        ``Mmio`` read, or ``Msr`` rdmsr: the 64-bit value for EDX:EAX) is
        waiting for.

        The pending read is completed exactly once: by the next ``run()``,
        or earlier by a register write, which completes it first so that
        the write wins.  Without a reply it reads all ones (an empty bus).
        A snapshot taken meanwhile holds the state before the instruction
        (a restore or clone runs it again) and keeps the read pending here.
        A restore abandons it.  reply() may be called again to change the
        answer until the read is completed; afterwards it raises."""
        exit = self._pending_exit("reply()", "read", "read")
        run = self.fd.run_struct
        if isinstance(exit, exits.Io) and exit.direction == "in":
            size, space, where = exit.size * exit.count, "reply() to port", exit.port
            target = ffi.buffer(ffi.cast("char *", run) + run.io.data_offset, size)
        elif isinstance(exit, exits.Mmio) and not exit.is_write:
            size, space, where = exit.size, "reply() to MMIO address", exit.address
            target = ffi.buffer(run.mmio.data, size)
        elif isinstance(exit, exits.Msr) and not exit.is_write:
            size, space, where = exit.size, "reply() to MSR", exit.index
            target = ffi.buffer(ffi.addressof(run.msr, "data"), size)
        else:
            raise Error(f"reply() answers a pending read, but the last exit was {exit!r}")
        target[:] = _native.read_answer(value, size, space, where)
        if isinstance(exit, exits.Msr):
            run.msr.error = 0  # answered, even after a refuse_msr()

    def _pending_exit(self, call: str, kind: Optional[str], what: str):
        """The last exit, if its access (a ``kind`` one, or any for None) is
        still pending; else an Error saying why ``call`` has nothing to act on."""
        self._check_open()
        pending = self._loop.pending_io if self._loop is not None else None
        if pending is None or (kind is not None and pending != kind):
            raise Error(f"{call} acts on a pending {what}, but none is pending "
                        f"(the last exit was {self.last_exit!r}; a run(), register write or "
                        "restore since then completed or abandoned it)")
        return self.last_exit

    # -- interrupts, MSI and GSI routing, translation, clocks, nested state, sregs2 ---

    def interrupt(self, vector: int) -> None:
        """Raises external interrupt ``vector`` (32-255) in a VM WITHOUT the
        in-kernel irqchip (``KVM_INTERRUPT``), as a PIC would.

        The guest takes it when it can (RFLAGS.IF set, no interrupt shadow):
        if the last exit said it can, KVM gets the vector now, for the next
        run(); otherwise it is queued and run() asks KVM for an exit when the
        guest becomes interruptible, hands it over and goes on running, so the
        exit is never seen.  Vectors raised meanwhile queue in order.  With the
        in-kernel irqchip KVM refuses KVM_INTERRUPT: raise interrupts through
        it instead (``vm.fd.irq_line``, ``vm.fd.irqfd``, :meth:`pyvt.Vm.signal_msi`)."""
        self._check_open()
        if self._vm.fd.has_irqchip:
            raise Error(f"vCPU {self.index}: this VM has the in-kernel irqchip, which "
                        "refuses KVM_INTERRUPT: raise the interrupt through it "
                        "(vm.fd.irq_line, vm.fd.irqfd or vm.signal_msi)")
        if isinstance(vector, bool) or not isinstance(vector, int) or not 0 <= vector <= 0xFF:
            raise ArgumentError(f"an interrupt vector is an int in 0-255, not {vector!r}")
        if vector < 32:
            raise ArgumentError(f"vectors 0-31 are CPU exceptions, not interrupts: "
                                f"use 32-255, not {vector}")
        if not self.fd.has_interrupt():  # else queued vectors would wait forever
            raise KvmError("KVM_INTERRUPT", errno.ENOTTY,
                           f"{self._vm.backend} does not implement it (pyvt.ko does not)")
        self._queued_vectors.append(vector)
        self._offer_queued_vector(None)

    def _offer_queued_vector(self, stop) -> bool:
        """Hands KVM the next queued vector if the guest can take it now
        (one per run: KVM holds a single one), and asks for the interrupt
        window while more wait.  True if ``stop`` is an exit the caller does
        not see, so run() goes on: the window pyvt asked for opening, or a
        hlt that the vector handed over now wakes (as a CPU with an
        interrupt pending does not halt)."""
        if stop in (_native.STOP_EXIT, _native.STOP_DEVICE):
            # KVM_RUN returned: KVM took the vector it held, and the run page's
            # ready_for_interrupt_injection is current again.
            self._vector_handed_over = False
        if not self._queued_vectors and not self._window_requested:
            return False
        run = self.fd.run_struct
        if run is None:  # closed from a handler during the run
            return False
        kvm_exit = run.exit_reason if stop == _native.STOP_EXIT else None
        window_exit = kvm_exit == lib.KVM_EXIT_IRQ_WINDOW_OPEN and self._window_requested
        handed_over = False
        if (self._queued_vectors and not self._vector_handed_over
                and run.ready_for_interrupt_injection):
            # KVM only queues it: a pending I/O access still completes first.
            self.fd.interrupt(self._queued_vectors.popleft())
            self._vector_handed_over = handed_over = True
        self._window_requested = bool(self._queued_vectors)
        run.request_interrupt_window = 1 if self._window_requested else 0
        return window_exit or (handed_over and kvm_exit == lib.KVM_EXIT_HLT)

    def nmi(self) -> None:
        """Raises a non-maskable interrupt (``KVM_NMI``): the guest takes it
        through IDT vector 2 on the next run(), whatever RFLAGS.IF.  Meant for
        VMs without the in-kernel irqchip (where it stands for the LINT1 pin);
        with it, KVM still injects the NMI straight into this vCPU."""
        self._check_open()
        self.fd.nmi()

    def translate(self, address: int) -> int:
        """The guest-physical address guest-virtual ``address`` maps to now,
        through the guest's own page tables (``KVM_TRANSLATE``); with paging
        off, the same address.  Raises :class:`pyvt.UnmappedAddressError`
        where nothing is mapped."""
        self._check_open()
        result = self.fd.translate(address)
        if not result.valid:
            raise UnmappedAddressError(
                f"vCPU {self.index}: guest-virtual address {address:#x} is not mapped by "
                f"the guest's page tables (CR3 {self.sregs.cr3:#x})")
        return result.physical_address

    # -- binary statistics -----------------------------------------------------

    @property
    def stats(self) -> Dict[str, StatValue]:
        """This vCPU's counters, ``{name: value}``: KVM's binary statistics
        (``exits``, ``io_exits``, ``halt_exits``... where the backend has
        KVM_CAP_BINARY_STATS_FD; not on pyvt.ko) merged with pyvt's run-loop
        counters, which keep their names if KVM ever uses them too:
        ``kvm_exits`` (KVM_RUN returns the run loop saw), ``native_exits``
        (those native devices served without Python), ``python_exits``
        (those Python handlers served: ``vm.on_io``...), ``coalesced_writes``
        (writes replayed from KVM's coalesced ring) and
        ``dirty_ring_full_exits`` (full dirty rings emptied on the way),
        ``guest_time_ns`` (time inside KVM_RUN) and ``exits_by_reason``
        (``{"io": n, "hlt": n, ...}``, the KVM_RUN returns by exit reason).
        Values are ints, lists of ints for histograms, and that one dict;
        what each one counts, in which unit and scale, is in
        :attr:`stats_descriptors`.  ``{}`` once the VM is closed.
        The stats fd is opened by the first read and closed with the VM;
        each read is a pread on it (other threads may run meanwhile).
        Opening it waits for the vCPU to leave KVM_RUN: a first read while
        the vCPU runs in another thread gives pyvt's counters only
        (``vm.run()`` opens it up front when the VM serves a control socket)."""
        loop = self._loop
        if loop is None:
            return {}
        running = self._running_thread
        if (not self._kvm_stats.is_open and running is not None
                and running != threading.get_ident()):
            # Opening the fd would wait for the guest to leave KVM_RUN
            # (forever for one that never exits): pyvt's counters only.
            values: Dict[str, StatValue] = {}
        else:
            values = self._kvm_stats.read()
        values.update(self._run_loop_stats())
        return values

    @property
    def stats_descriptors(self) -> Dict[str, StatsDescriptor]:
        """What each key of :attr:`stats` is: ``{name:
        pyvt.kvm_stats.StatsDescriptor}`` with its type, unit and scale
        (``halt_wait_ns`` counts 1e-9 seconds; ``halt_wait_hist`` is a log
        histogram of them).  pyvt's run-loop counters are plain counts."""
        self._check_open()
        descriptors = self._kvm_stats.descriptors()
        descriptors.update(RUN_LOOP_MEASURES)
        return descriptors

    def _open_stats(self) -> None:
        """Opens KVM's stats fd (if the backend has one) before a run: the
        ioctl that makes it waits while the vCPU is inside KVM_RUN, reads of
        the fd do not."""
        self._kvm_stats.read()

    def _run_loop_stats(self) -> Dict[str, StatValue]:
        """The run loop's counters and measures (RUN_LOOP_STATS), read from
        its memory without a system call; {} once closed."""
        loop = self._loop
        if loop is None:
            return {}
        values: Dict[str, StatValue] = loop.stats
        values["guest_time_ns"] = loop.guest_ns
        values["exits_by_reason"] = {exit_reason_name(reason): count for reason, count
                                     in enumerate(loop.exits_by_reason) if count}
        return values

    # -- MSR filters and user-space MSR exits ----------------------------------

    def refuse_msr(self) -> None:
        """Makes the ``rdmsr``/``wrmsr`` that the last exit (an unclaimed
        :class:`pyvt.exits.Msr`) is waiting on take #GP in the guest, as
        raising :class:`pyvt.MsrFault` does in a ``vm.on_msr`` handler.

        Like :meth:`reply`, it acts on the pending access (completed by the
        next ``run()`` or register write); a later ``reply()`` to a read
        answers it instead."""
        exit = self._pending_exit("refuse_msr()", None, "rdmsr or wrmsr")
        if not isinstance(exit, exits.Msr):
            raise Error(f"refuse_msr() refuses a pending rdmsr or wrmsr, but the last exit "
                        f"was {exit!r}")
        self.fd.run_struct.msr.error = 1

    def _drain(self) -> None:
        if self._loop is not None and not self.fd.closed:
            self._loop.drain()

    def _close(self) -> None:
        if self._loop is not None:
            self._loop.close()
            self._loop = None
        self._kvm_stats.close()
        self.fd.close()


class paused:
    """``with paused(vm):`` holds every vCPU of ``vm`` stopped, and the VM's
    pause lock, while a snapshot or restore copies state; a run() that
    comes meanwhile waits for it (see :meth:`Vcpu._acquire_run_lock`).
    ``pending_io`` is what becomes of the access each vCPU's last exit left
    pending: ``"complete writes"`` (a snapshot: the guest made them) or
    ``"abandon"`` (a restore: nothing may complete on top of the state it
    puts back).  Raises :class:`pyvt.SnapshotError` if a vCPU is running."""

    def __init__(self, vm, pending_io: str, states: Optional[Mapping[int, VcpuState]] = None):
        if pending_io not in ("complete writes", "abandon"):
            raise ArgumentError(f"pending_io is 'complete writes' or 'abandon', not {pending_io!r}")
        self.pause_lock = vm._pause_lock
        self.vcpus = list(vm.vcpus.values())
        self.pending_io = pending_io
        #: For "abandon": {vCPU index: the state the restore writes next}
        #: (a port write that cannot act on it may stay pending).
        self.states = states or {}

    def __enter__(self):
        self.pause_lock.acquire()
        me = threading.get_ident()
        for held, vcpu in enumerate(self.vcpus):
            if not vcpu._run_lock.acquire(False):
                for taken in self.vcpus[:held]:
                    taken._paused_by = None
                    taken._run_lock.release()
                self.pause_lock.release()
                raise SnapshotError("a vCPU is running: stop it (cpu.stop()) before a "
                                    "snapshot or restore")
            vcpu._paused_by = me
        try:
            if self.pending_io == "abandon":
                for vcpu in self.vcpus:
                    vcpu._abandon_pending_io(self.states.get(vcpu.index))
            else:
                for vcpu in self.vcpus:
                    vcpu._settle_for_snapshot()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        for vcpu in self.vcpus:
            vcpu._paused_by = None
            vcpu._run_lock.release()
        self.pause_lock.release()


#: Run-page parts that must hold the exit's values to read its linear RIP.
_SYNCED_AT_EXIT = lib.KVM_SYNC_X86_REGS | lib.KVM_SYNC_X86_SREGS
_EFER_LMA = 1 << 10
#: The longest x86 instruction: a fast OUT's completion skips it only if the
#: linear RIP is still the OUT's, which lies at most this far before the
#: exit's RIP (an emulated OUT has moved RIP past itself by the exit).
_MAX_INSTRUCTION = 15


def _is_64_bit(efer: int, cs_l: int) -> bool:
    return bool(efer & _EFER_LMA and cs_l)


def _linear_rip(is_64_bit: bool, cs_base: int, rip: int) -> int:
    """kvm_get_linear_rip(): RIP in 64-bit code, else (u32)(CS base + RIP)."""
    return rip if is_64_bit else (cs_base + rip) & 0xFFFFFFFF


def _near_out(exit_rip: int, rip: int) -> bool:
    """True if linear ``rip`` may be the OUT's whose exit left linear RIP
    ``exit_rip`` (in [exit_rip - 15, exit_rip], with 32-bit wrap-around)."""
    distance = (exit_rip - rip) & 0xFFFFFFFFFFFFFFFF
    return distance <= _MAX_INSTRUCTION or distance & 0xFFFFFFFF <= _MAX_INSTRUCTION


def _entry_mode(state: VcpuState) -> Optional[Tuple[bool, int, int]]:
    """(64-bit, CS base, RIP) of the vCPU once ``state`` is written; kept
    with the state while its regs and sregs are the same bytes objects."""
    sregs = state.sregs2 if state.sregs2 is not None else state.sregs
    cached = state._structs.get("entry mode")
    if cached is not None and cached[0] is state.regs and cached[1] is sregs:
        return cached[2]
    if (sregs is None or len(sregs) < _SREGS_COMMON_SIZE or not isinstance(state.regs, bytes)
            or len(state.regs) != _REGS_SIZE):
        return None  # the write itself reports it; nothing is deferred
    view = ffi.cast("struct kvm_sregs *", ffi.from_buffer(sregs[:_SREGS_SIZE].ljust(
        _SREGS_SIZE, b"\0")))
    rip = ffi.cast("struct kvm_regs *", ffi.from_buffer(state.regs)).rip
    mode = (_is_64_bit(view.efer, view.cs.l), view.cs.base, rip)
    state._structs["entry mode"] = (state.regs, sregs, mode)
    return mode


_SYNCED_USER_MODE = lib.KVM_SYNC_X86_SREGS | lib.KVM_SYNC_X86_EVENTS


def _user_mode_plan(fd, state: VcpuState) -> Optional[Tuple[bytes, int, int, int, int, int,
                                                           bytes]]:
    """_native.restore_user_mode's arguments (but ``synced``) for ``state``,
    built from vcpu_state's cached structs and kept with the state while
    its fields are the same objects; None where the Python path must run
    (a malformed state, which it reports)."""
    key = (state.regs, state.sregs, state.sregs2, state.xsave, state.fpu, state.events)
    cached = state._structs.get("user mode plan")
    if cached is not None and all(a is b for a, b in zip(cached[0], key, strict=True)):
        return cached[1]
    xsave_ok = state.xsave is None or (
        ffi.sizeof("struct kvm_xsave") <= len(state.xsave) <= fd.xsave_size())
    if (not isinstance(state.regs, bytes) or len(state.regs) != _REGS_SIZE or not xsave_ok
            or (state.events is not None and len(state.events) != _EVENTS_SIZE)
            or (state.sregs is None and state.sregs2 is None)):
        return None
    # vcpu_state's own choices and cached structs: the same bytes go to KVM.
    request, sregs = _sregs_write(fd, state)
    xsave = None if state.xsave is None else vcpu_state._xsave_struct(fd, state)
    fpu = None if vcpu_state._fpu_in_xsave(state.xsave) else \
        vcpu_state._cached_struct(state, "fpu", "struct kvm_fpu")
    plan = (state.regs, request, _address(sregs), _SREGS_COMMON_SIZE, _address(xsave),
            _address(fpu), state.events or b"")
    # The structs stay alive with the plan (the addresses point into them).
    state._structs["user mode plan"] = (key, plan, (sregs, xsave, fpu))
    return plan


def _sregs_write(fd, state: VcpuState):
    """(request, struct) of the special-register write, chosen as
    vcpu_state._write_sregs chooses (KVM_SET_SREGS2 where the backend has it)."""
    if "KVM_CAP_SREGS2" in caps and fd.vm.kvm.check_extension("KVM_CAP_SREGS2"):
        return lib.KVM_SET_SREGS2, vcpu_state._sregs_as(state.sregs2, state.sregs,
                                                         "struct kvm_sregs2")
    return lib.KVM_SET_SREGS, vcpu_state._sregs_as(state.sregs, state.sregs2, "struct kvm_sregs")


def _address(struct) -> int:
    return 0 if struct is None else int(ffi.cast("uintptr_t", struct))


def _state_batch(fd, state: VcpuState) -> Optional[_native.StateWrites]:
    """vcpu_state.write's ioctls for ``state`` but the general registers,
    in its order (sregs, XCRs, XSAVE, FPU, LAPIC, MSRs, events, debug
    registers, MP state), from the same structs, as one native batch; kept
    with the state while its fields and MSRs are the same and KVM refuses
    no more MSRs.  None where vcpu_state.write must run: nested state, or
    a malformed state (which it reports)."""
    refused = vcpu_state._REFUSED_MSRS.get(fd.vm.kvm.path, set())  # only grows
    key = (len(refused), fd.xsave_size())
    cached = state._structs.get("write batch")
    if cached is not None and cached[0] == key and \
            cached[1] == vcpu_state.fingerprint(state)[1:]:
        return cached[2]
    if (state.nested is not None or state.xsave is not None and not
            ffi.sizeof("struct kvm_xsave") <= len(state.xsave) <= fd.xsave_size()):
        return None
    writes: List[tuple] = []
    keep: List[object] = []  # the structs the batch points into

    def add(request: int, struct, expect: int = 0) -> None:
        keep.append(struct)
        writes.append((request, _address(struct), expect))

    try:
        add(*_sregs_write(fd, state))
        if state.xcrs is not None:
            add(lib.KVM_SET_XCRS, vcpu_state._cached_struct(state, "xcrs", "struct kvm_xcrs"))
        if state.xsave is not None:
            add(lib.KVM_SET_XSAVE, vcpu_state._xsave_struct(fd, state))
        add(lib.KVM_SET_FPU, vcpu_state._cached_struct(state, "fpu", "struct kvm_fpu"))
        if state.lapic is not None:
            add(lib.KVM_SET_LAPIC, vcpu_state._cached_struct(state, "lapic",
                                                             "struct kvm_lapic_state"))
        msrs = {index: value for index, value in state.msrs.items() if index not in refused}
        if msrs:
            add(lib.KVM_SET_MSRS, msrs_struct(msrs), len(msrs))
        if state.events is not None:
            add(lib.KVM_SET_VCPU_EVENTS, vcpu_state._cached_struct(
                state, "events", "struct kvm_vcpu_events"))
        if state.debugregs is not None:
            add(lib.KVM_SET_DEBUGREGS, vcpu_state._cached_struct(
                state, "debugregs", "struct kvm_debugregs"))
        if state.mp_state is not None:
            add(lib.KVM_SET_MP_STATE, ffi.new("struct kvm_mp_state *",
                                              {"mp_state": state.mp_state}))
    except (Error, ValueError, TypeError, OverflowError):
        return None  # malformed: vcpu_state.write says how
    batch = _native.StateWrites(writes)
    # The fingerprint without the state itself: no reference cycle.
    state._structs["write batch"] = (key, vcpu_state.fingerprint(state)[1:], batch, keep)
    return batch


def _timeout_seconds(timeout) -> float:
    """run()'s timeout for the native loop: seconds, or -1.0 for none."""
    if timeout is None:
        return -1.0
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise ArgumentError(f"timeout must be a number of seconds or None, not {timeout!r}")
    try:
        seconds = float(timeout)
    except OverflowError:  # an int beyond any float: centuries
        seconds = math.inf if timeout > 0 else -math.inf
    if math.isnan(seconds) or seconds < 0:
        raise ArgumentError(f"timeout must be a non-negative number of seconds "
                            f"(None or inf: no limit), not {timeout!r}")
    return -1.0 if math.isinf(seconds) else seconds


# Spawning many VMs repeats the same setup; these caches make the second
# and later vCPUs cheap (Python work between ioctls is what a spawn costs).

@functools.lru_cache(maxsize=1024)
def _initial_cpuid_table(kvm, index: int) -> bytes:
    """The supported CPUID as a kvm_cpuid2, with APIC ID ``index``."""
    table = bytearray(kvm.supported_cpuid_table())
    cpuid = ffi.cast("struct kvm_cpuid2 *", ffi.from_buffer(table))
    for i in range(cpuid.nent):
        entry = cpuid.entries[i]
        if entry.function == 1:  # initial APIC ID in EBX[31:24]
            entry.ebx = (entry.ebx & 0x00FFFFFF) | ((index & 0xFF) << 24)
        elif entry.function in (0xB, 0x1F):  # x2APIC ID in EDX
            entry.edx = index
    return bytes(table)


@functools.lru_cache(maxsize=64)
def _mode_sregs(mode: str, ring: int, reset_sregs: bytes) -> bytes:
    """``reset_sregs`` (a fresh vCPU's kvm_sregs) put in ``mode`` at ``ring``."""
    sregs = ffi.new("struct kvm_sregs *")
    ffi.buffer(sregs)[:] = reset_sregs
    modes.apply_sregs(mode, sregs, ring)
    return bytes(ffi.buffer(sregs))


def disassemble(code: bytes, address: int, bits: int) -> str:
    """The first instruction of ``code``, if the optional capstone is installed."""
    if not code:
        return ""
    try:
        import capstone
    except ImportError:
        return ""
    mode = {16: capstone.CS_MODE_16, 32: capstone.CS_MODE_32}.get(bits, capstone.CS_MODE_64)
    for insn in capstone.Cs(capstone.CS_ARCH_X86, mode).disasm(code, address):
        return f"{insn.mnemonic} {insn.op_str}".strip()
    return "(invalid instruction)"
