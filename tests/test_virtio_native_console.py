"""The native virtio-console worker over pipes: input reaches the guest's
receive buffers, the guest's output reaches out_fd, end of input, and
positions kept across stop/start."""

from __future__ import annotations

import os
import select
import time

import pytest

import pyvt
from pyvt._virtio import ConsoleWorker

from virtio_native_driver import VIRTIO_F_VERSION_1, Queue

pytestmark = pytest.mark.requires_kvm

RING = 0x10000
RX_BUF = 0x100000
TX_BUF = 0x200000


@pytest.fixture
def console(vm):
    """(worker, rx queue, tx queue, write end of its input, read end of its output)."""
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    con = ConsoleWorker(vm.memory, in_r, out_w)
    os.close(in_r)
    os.close(out_w)
    rx = Queue(vm.memory, RING, 16)
    tx = Queue(vm.memory, RING + 0x8000, 16)
    rx.attach(con, ConsoleWorker.RX_QUEUE)
    tx.attach(con, ConsoleWorker.TX_QUEUE)
    con.set_features(1 << VIRTIO_F_VERSION_1)
    con.start()
    yield con, rx, tx, in_w, out_r
    con.stop()
    for fd in (in_w, out_r):
        try:
            os.close(fd)
        except OSError:
            pass
    rx.close()
    tx.close()


def read_exactly(fd, n):
    data = b""
    while len(data) < n:
        chunk = os.read(fd, n - len(data))
        assert chunk, "out_fd closed early"
        data += chunk
    return data


def test_output_reaches_out_fd(vm, console):
    con, rx, tx, in_w, out_r = console
    vm.memory.write(TX_BUF, b"hello, ")
    vm.memory.write(TX_BUF + 0x100, b"host\n")
    head = tx.add([(TX_BUF, 7, False), (TX_BUF + 0x100, 5, False)])
    assert tx.wait_used() == [(head, 0)]
    assert read_exactly(out_r, 12) == b"hello, host\n"
    assert con.stats[1]["bytes"] == 12


def test_input_reaches_the_guest(vm, console):
    con, rx, tx, in_w, out_r = console
    head = rx.add([(RX_BUF, 64, True)])
    os.write(in_w, b"typed")
    assert rx.wait_used() == [(head, 5)]
    assert vm.memory.read(RX_BUF, 5) == b"typed"


def test_input_waits_for_buffers(vm, console):
    con, rx, tx, in_w, out_r = console
    os.write(in_w, b"early")   # no buffer yet: the worker stops reading
    rx.add([(RX_BUF, 3, True)])   # then the guest posts small ones; the kick resumes it
    assert rx.wait_used()[0][1] == 3
    assert vm.memory.read(RX_BUF, 3) == b"ear"
    rx.add([(RX_BUF + 16, 16, True)])
    assert rx.wait_used()[0][1] == 2
    assert vm.memory.read(RX_BUF + 16, 2) == b"ly"


def test_end_of_input(vm, console):
    con, rx, tx, in_w, out_r = console
    rx.add([(RX_BUF, 64, True)])
    os.close(in_w)
    deadline = time.monotonic() + 20
    while not con.input_closed:
        assert time.monotonic() < deadline, "the worker did not see the end of input"
        time.sleep(0.01)
    # The posted buffer stays with the device; output still works.
    assert rx.used_idx == 0
    vm.memory.write(TX_BUF, b"bye")
    tx.add([(TX_BUF, 3, False)])
    tx.wait_used()
    assert read_exactly(out_r, 3) == b"bye"


def test_stop_start_keeps_positions(vm, console):
    con, rx, tx, in_w, out_r = console
    for word in (b"one", b"two"):
        vm.memory.write(TX_BUF, word)
        tx.add([(TX_BUF, 3, False)])
        tx.wait_used()
    con.stop()
    vm.memory.write(TX_BUF, b"six")
    tx.add([(TX_BUF, 3, False)])
    assert con.queue_state(1) == (2, 2)
    con.start()
    tx.wait_used()
    assert read_exactly(out_r, 9) == b"onetwosix"
    assert con.queue_state(1) == (3, 3)


def test_no_fds(vm):
    con = ConsoleWorker(vm.memory, None, None)
    tx = Queue(vm.memory, RING, 16)
    rx = Queue(vm.memory, RING + 0x8000, 16)
    tx.attach(con, 1)
    rx.attach(con, 0)
    rx.add([(RX_BUF, 16, True)])   # posted, never filled: nothing to read
    con.start()
    try:
        tx.add([(TX_BUF, 3, False)])
        assert tx.wait_used() == [(0, 0)]   # dropped
    finally:
        con.stop()
        tx.close()
        rx.close()
    assert rx.used_idx == 0 and con.stats[0]["requests"] == 0
    with pytest.raises(pyvt.ArgumentError):
        ConsoleWorker(vm.memory, -1, None)


def test_stop_returns_while_out_fd_is_full(vm):
    """Nobody reads the output pipe: the worker waits for room, and
    stop() still returns (the chain goes back to the ring, not lost)."""
    out_r, out_w = os.pipe()
    con = ConsoleWorker(vm.memory, None, out_w)
    os.close(out_w)
    tx = Queue(vm.memory, RING, 16)
    tx.attach(con, ConsoleWorker.TX_QUEUE)
    big = 1 << 20   # more than a pipe holds
    tx.add([(TX_BUF, big, False)])
    con.start()
    assert select.select([out_r], [], [], 20)[0], "the worker wrote nothing"
    con.stop()                     # returns: the worker waits for room in poll()
    assert tx.used_idx == 0 and con.queue_state(1) == (0, 0)
    os.close(out_r)
    tx.close()
