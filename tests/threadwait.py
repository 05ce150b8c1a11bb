"""Helpers for tests that run a vCPU in another thread."""

import time


def wait_until_running(cpu, limit: float = 30.0) -> None:
    """Blocks until another thread's ``cpu.run()`` is under way (a loaded
    machine can take a while to start a thread)."""
    deadline = time.monotonic() + limit
    while cpu._running_thread is None:
        assert time.monotonic() < deadline, "the vCPU thread never started running"
        time.sleep(0.01)
    time.sleep(0.05)  # and inside the run loop, not just past the lock
