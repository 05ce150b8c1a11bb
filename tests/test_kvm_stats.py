"""KVM's binary statistics (KVM_GET_STATS_FD): the thin layer's StatsFd and
vm.stats / cpu.stats, which merge them with pyvt's run-loop counters."""

import os
import time

import pytest

import pyvt
from pyvt import exits
from pyvt._kvm import ffi, lib
from pyvt.kvm_stats import StatsDescriptor, StatsFd
from pyvt.modes import LOAD_ADDRESS
from pyvt.dirty_rate import DIRTY_PAGE_STATS
from pyvt.vcpu import RUN_LOOP_COUNTERS, RUN_LOOP_MEASURES, RUN_LOOP_STATS

pytestmark = pytest.mark.requires_kvm
needs_stats = pytest.mark.requires_cap("KVM_CAP_BINARY_STATS_FD")

PORT = 0x10
#: PVM (/sys/module/kvm_pvm) emulates port I/O in its instruction emulator
#: and does not count it in io_exits, which VMX's and SVM's exit handlers do.
ON_PVM = os.path.exists("/sys/module/kvm_pvm")


def port_io_guest(count: int) -> bytes:
    """Protected-mode code that writes port PORT ``count`` times, then halts."""
    return pyvt.assemble(f"""
        .code32
        .globl _start
        _start:
            mov ${count}, %ecx
        1:  out %al, ${PORT}
            loop 1b
            hlt
        """, at=LOAD_ADDRESS, name=f"stats_port_io_{count}")


def load_port_io_guest(vm, count: int):
    vm.memory.write(LOAD_ADDRESS, port_io_guest(count))
    cpu = vm.vcpu(0, mode="protected")
    cpu.regs.rip = LOAD_ADDRESS
    return cpu


def stats_fds() -> list:
    """This process's open KVM stats fds (anon_inode:kvm-vm-stats, kvm-vcpu-stats:N)."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue  # the listing's own fd, closed meanwhile
        if target.startswith("anon_inode:kvm-") and "-stats" in target:
            found.append(target)
    return sorted(found)


@needs_stats
@pytest.mark.parametrize("count", [40, 80])
def test_exit_counters_grow_with_the_guests_port_io(vm, count):
    writes = []
    vm.on_io(PORT, writes.append)
    cpu = load_port_io_guest(vm, count)
    before = cpu.stats
    exit = cpu.run(timeout=30)
    after = cpu.stats
    assert isinstance(exit, exits.Hlt), exit
    assert len(writes) == count
    delta = {name: after[name] - before[name] for name in
             ("exits", "io_exits", "halt_exits", "kvm_exits", "insn_emulation")}
    # Port 0x10 has no in-kernel device: every out leaves the guest, and so
    # does the hlt (no in-kernel irqchip).  KVM counts every exit, also the
    # ones it handles itself (host interrupts, emulation): so at least these.
    assert delta["exits"] >= count + 1, delta
    # The guest halted once.
    assert delta["halt_exits"] == 1, delta
    # pyvt's run loop saw each of them return from KVM_RUN (the outs to run
    # the Python handler); a tick or kick may add returns that are no exit.
    assert delta["kvm_exits"] >= count + 1, delta
    if ON_PVM and delta["io_exits"] == 0:
        # PVM: the outs went through the instruction emulator instead.
        assert delta["insn_emulation"] >= count, delta
    else:
        assert delta["io_exits"] == count, delta


@needs_stats
def test_descriptors_decode_names_types_and_units(vm):
    cpu = vm.vcpu(0)
    descriptors = cpu.stats_descriptors
    assert set(descriptors) == set(cpu.stats)
    assert descriptors["exits"] == StatsDescriptor(
        "exits", "cumulative", "none", 10, 0, 1, 0, descriptors["exits"].offset,
        descriptors["exits"].flags)
    assert descriptors["exits"].offset is not None and descriptors["exits"].offset % 8 == 0
    wait = descriptors["halt_wait_ns"]
    assert (wait.type, wait.unit, wait.base, wait.exponent) == ("cumulative", "seconds", 10, -9)
    assert wait.scale == pytest.approx(1e-9)
    hist = descriptors["halt_wait_hist"]
    assert (hist.type, hist.unit, hist.is_histogram) == ("log_histogram", "seconds", True)
    assert hist.size > 1
    ranges = hist.bucket_ranges()
    assert len(ranges) == hist.size
    assert ranges[:4] == [(0, 1.0), (1, 2.0), (2, 4.0), (4, 8.0)]
    assert ranges[-1] == (1 << (hist.size - 2), float("inf"))
    linear = StatsDescriptor("x", "linear_histogram", size=3, bucket_size=10)
    assert linear.bucket_ranges() == [(0, 10.0), (10, 20.0), (20, float("inf"))]
    with pytest.raises(pyvt.ArgumentError, match="exits is a cumulative statistic"):
        descriptors["exits"].bucket_ranges()
    # Every descriptor decoded to a known type and unit (none "unknown").
    kvm_names = [d for d in descriptors.values() if d.offset is not None]
    assert {d.type for d in kvm_names} <= {"cumulative", "instant", "peak",
                                           "linear_histogram", "log_histogram"}
    assert {d.unit for d in kvm_names} <= {"none", "bytes", "seconds", "cycles", "boolean"}
    # pyvt's own counters are described too: plain counts held by no stats fd.
    for name in RUN_LOOP_COUNTERS:
        assert descriptors[name] == StatsDescriptor(name)
        assert descriptors[name].offset is None
    vm_descriptors = vm.stats_descriptors
    assert vm_descriptors["max_mmu_rmap_size"].type == "peak"
    assert vm_descriptors["pages_4k"].type == "instant"


@needs_stats
def test_histograms_read_as_lists_and_counters_as_ints(vm):
    cpu = vm.vcpu(0)
    values, descriptors = cpu.stats, cpu.stats_descriptors
    histograms = [name for name, d in descriptors.items() if d.is_histogram]
    assert histograms
    for name, desc in descriptors.items():
        value = values[name]
        if name == "exits_by_reason":  # pyvt's one dict: counts by reason name
            assert isinstance(value, dict), name
            assert all(isinstance(k, str) and isinstance(n, int) and n > 0
                       for k, n in value.items()), value
        elif desc.is_histogram or desc.size > 1:
            assert isinstance(value, list) and len(value) == desc.size, name
            assert all(isinstance(item, int) and item >= 0 for item in value), name
        else:
            assert isinstance(value, int) and value >= 0, name


@needs_stats
def test_vm_stats_merge_kvms_with_pyvts_totals(vm):
    writes = []
    vm.on_io(PORT, writes.append)
    cpu = load_port_io_guest(vm, 10)
    cpu.run(timeout=30)
    stats = vm.stats
    for name in ("remote_tlb_flush", "pages_4k", "max_mmu_rmap_size"):
        assert isinstance(stats[name], int), name
    # Per-vCPU statistics stay on the vCPU.
    assert "exits" not in stats
    cpu_stats = cpu.stats
    for name in RUN_LOOP_COUNTERS:
        assert stats[name] == cpu_stats[name]
    assert stats["kvm_exits"] >= 11


@needs_stats
def test_thin_layer_stats_fd(vm):
    before = stats_fds()
    cpu = vm.vcpu(0)
    with cpu.fd.get_stats_fd() as stats:
        assert isinstance(stats, StatsFd)
        assert stats.header.num_desc == len(stats.descriptors)
        assert stats.header.data_offset >= stats.header.desc_offset
        assert stats.id.startswith("kvm-") and stats.id.endswith("/vcpu-0")
        first = stats.read()
        assert set(first) == set(stats.descriptors)
        assert stats.read()["exits"] >= first["exits"]
    assert stats.closed
    with pytest.raises(pyvt.ClosedError):
        stats.read()
    with vm.fd.get_stats_fd() as vm_stats:
        assert vm_stats.id.startswith("kvm-") and "/" not in vm_stats.id
        assert "remote_tlb_flush" in vm_stats.read()
    assert stats_fds() == before


@needs_stats
def test_stats_fds_are_cached_and_closed_with_the_vm(kvm):
    before = stats_fds()
    vm = pyvt.Vm("16M", backend=kvm.path)
    try:
        cpus = [vm.vcpu(0), vm.vcpu(1)]
        for _ in range(3):
            assert "pages_4k" in vm.stats
            for cpu in cpus:
                assert "exits" in cpu.stats
                assert "exits" in cpu.stats_descriptors
        # One fd each, however often they are read.
        assert stats_fds() == sorted(before + ["anon_inode:kvm-vcpu-stats:0",
                                               "anon_inode:kvm-vcpu-stats:1",
                                               "anon_inode:kvm-vm-stats"])
    finally:
        vm.close()
    assert stats_fds() == before
    with pytest.raises(pyvt.ClosedError):
        _ = vm.stats
    assert cpus[0].stats == {}


def test_backend_without_binary_stats_gives_pyvts_counters(vm, monkeypatch):
    """pyvt.ko has no KVM_CAP_BINARY_STATS_FD: this one pretends not to either."""
    answer = vm.kvm.check_extension

    def without_binary_stats(cap):
        if cap in ("KVM_CAP_BINARY_STATS_FD", pyvt.kvm.caps["KVM_CAP_BINARY_STATS_FD"]):
            return 0
        return answer(cap)

    monkeypatch.setattr(vm.kvm, "check_extension", without_binary_stats)
    before = stats_fds()
    writes = []
    vm.on_io(PORT, writes.append)
    cpu = load_port_io_guest(vm, 5)
    assert isinstance(cpu.run(timeout=30), exits.Hlt)
    assert set(cpu.stats) == set(RUN_LOOP_STATS)
    assert cpu.stats["kvm_exits"] >= 6
    assert vm.stats == {**{name: cpu.stats[name] for name in RUN_LOOP_STATS},
                        "dirty_pages": 0, "dirty_pages_per_s": 0}
    assert set(cpu.stats_descriptors) == set(RUN_LOOP_STATS)
    assert set(vm.stats_descriptors) == set(RUN_LOOP_STATS) | set(DIRTY_PAGE_STATS)
    with pytest.raises(pyvt.KvmError, match="KVM_CAP_BINARY_STATS_FD"):
        vm.fd.get_stats_fd()
    with pytest.raises(pyvt.KvmError, match="KVM_CAP_BINARY_STATS_FD"):
        cpu.fd.get_stats_fd()
    assert stats_fds() == before


def stats_file(descriptors, data, name_size=16, truncate=0) -> int:
    """A memfd laid out as a stats fd: header, id, descriptors, data.
    ``descriptors``: (name, flags, exponent, size, offset, bucket_size)."""
    header = ffi.new("struct kvm_stats_header *")
    stride = ffi.sizeof("struct kvm_stats_desc") + name_size
    header.name_size = name_size
    header.num_desc = len(descriptors)
    header.id_offset = ffi.sizeof(header[0])
    header.desc_offset = header.id_offset + name_size
    header.data_offset = header.desc_offset + stride * len(descriptors)
    blob = bytearray(bytes(ffi.buffer(header)) + b"test-id".ljust(name_size, b"\0"))
    for name, flags, exponent, size, offset, bucket_size in descriptors:
        raw = ffi.new("char[]", stride)
        desc = ffi.cast("struct kvm_stats_desc *", raw)
        desc.flags, desc.exponent, desc.size = flags, exponent, size
        desc.offset, desc.bucket_size = offset, bucket_size
        blob += bytes(ffi.buffer(raw))[:ffi.sizeof("struct kvm_stats_desc")] + \
            name.encode().ljust(name_size, b"\0")
    blob += b"".join(value.to_bytes(8, "little") for value in data)
    fd = os.memfd_create("fake-stats")
    os.write(fd, bytes(blob[:len(blob) - truncate]))
    return fd


def test_stats_fd_decodes_every_kind_of_statistic():
    """What this host's KVM has none of (linear histograms, bytes, cycles,
    powers of two, a kind newer than pyvt), from a file laid out the same way."""
    linear = lib.KVM_STATS_TYPE_LINEAR_HIST | lib.KVM_STATS_UNIT_BYTES | lib.KVM_STATS_BASE_POW2
    cycles = lib.KVM_STATS_TYPE_PEAK | lib.KVM_STATS_UNIT_CYCLES
    with StatsFd(stats_file([("sizes", linear, 10, 3, 16, 4),
                             ("busiest", cycles, 0, 1, 0, 0),
                             ("future", 0xF | 0xF0, 0, 1, 8, 0)],
                            [7, 9, 1, 2, 3])) as stats:
        assert stats.id == "test-id"
        assert stats.read() == {"sizes": [1, 2, 3], "busiest": 7, "future": 9}
        sizes = stats.descriptors["sizes"]
        assert (sizes.type, sizes.unit, sizes.base, sizes.exponent, sizes.scale) == \
            ("linear_histogram", "bytes", 2, 10, 1024)
        assert sizes.bucket_ranges() == [(0, 4.0), (4, 8.0), (8, float("inf"))]
        assert (stats.descriptors["busiest"].type, stats.descriptors["busiest"].unit) == \
            ("peak", "cycles")
        future = stats.descriptors["future"]
        assert (future.type, future.unit) == ("unknown (0xf)", "unknown (0xf0)")


def test_a_stats_fd_shorter_than_its_header_says_is_refused():
    fd = stats_file([("a", 0, 0, 1, 0, 0), ("b", 0, 0, 1, 8, 0)], [1, 2], truncate=8)
    with StatsFd(fd) as stats:
        with pytest.raises(pyvt.BackendError, match="gave 8 of the 16 bytes"):
            stats.read()
    fd = stats_file([("a", 0, 0, 1, 0, 0)], [1], truncate=8 + 20)
    with pytest.raises(pyvt.BackendError, match="bytes at offset"):
        StatsFd(fd)
    with pytest.raises(OSError):
        os.fstat(fd)  # StatsFd closed it


def test_exits_by_reason_and_guest_time(vm):
    """pyvt's run loop counts every KVM_RUN return by its exit reason and
    the time spent inside KVM_RUN; vm.stats sums them over the vCPUs."""
    writes = []
    vm.on_io(PORT, writes.append)
    cpu = load_port_io_guest(vm, 10)
    assert cpu.stats["exits_by_reason"] == {} and cpu.stats["guest_time_ns"] == 0
    started = time.monotonic_ns()
    assert isinstance(cpu.run(timeout=30), exits.Hlt)
    elapsed = time.monotonic_ns() - started
    stats = cpu.stats
    by_reason = stats["exits_by_reason"]
    assert by_reason["io"] == 10 and by_reason["hlt"] == 1
    assert stats["python_exits"] == 10 == len(writes) and stats["native_exits"] == 0
    assert sum(by_reason.values()) == stats["kvm_exits"]
    assert 0 < stats["guest_time_ns"] <= elapsed
    assert cpu.stats_descriptors["guest_time_ns"] == RUN_LOOP_MEASURES["guest_time_ns"]
    assert cpu.stats_descriptors["guest_time_ns"].scale == pytest.approx(1e-9)
    # A second vCPU adds its own; the VM's figures are the sums.
    vm.memory.write(0x3000, b"\xf4")
    other = vm.vcpu(1, mode="protected")
    other.regs.rip = 0x3000
    assert isinstance(other.run(timeout=30), exits.Hlt)
    totals = vm.stats
    assert totals["exits_by_reason"]["hlt"] == 2
    assert totals["exits_by_reason"]["io"] == 10
    assert totals["guest_time_ns"] == stats["guest_time_ns"] + other.stats["guest_time_ns"]
    assert totals["kvm_exits"] == sum(totals["exits_by_reason"].values())


def test_exit_reason_names():
    from pyvt.vcpu import exit_reason_name

    assert exit_reason_name(lib.KVM_EXIT_IO) == "io"
    assert exit_reason_name(lib.KVM_EXIT_X86_WRMSR) == "x86_wrmsr"
    assert exit_reason_name(lib.KVM_EXIT_DIRTY_RING_FULL) == "dirty_ring_full"
    assert exit_reason_name(40) == "reason_40"
    last = pyvt._native.EXIT_REASON_SLOTS - 1
    assert exit_reason_name(last) == f"reason_{last}_or_more"


def test_dirty_pages_rate_while_the_vm_logs_its_writes(vm):
    """vm.stats counts the pages KVM's dirty log reported at each harvest;
    0 while nothing harvests."""
    assert vm.stats["dirty_pages"] == 0 and vm.stats["dirty_pages_per_s"] == 0
    vm.memory.write(LOAD_ADDRESS, pyvt.assemble("""
        .code32
        .globl _start
        _start:
            mov $0x200000, %edi
            mov $32, %ecx
        1:  movl $1, (%edi)
            add $4096, %edi
            loop 1b
            hlt
        """, at=LOAD_ADDRESS, name="stats_dirty_32"))
    cpu = vm.vcpu(0, mode="protected")
    cpu.regs.rip = LOAD_ADDRESS
    try:
        vm.memory.dirty_pages()  # starts logging: every page counts as written once
    except pyvt.BackendError as e:  # pyvt.ko keeps no dirty log
        pytest.skip(str(e))
    first = vm.stats["dirty_pages"]
    time.sleep(0.05)
    assert isinstance(cpu.run(timeout=30), exits.Hlt)
    written = vm.memory.dirty_pages()
    guest_pages = {page for region in written for page in region}
    assert {0x200000 + 4096 * i for i in range(32)} <= guest_pages
    stats = vm.stats
    assert stats["dirty_pages"] - first >= 32
    assert stats["dirty_pages_per_s"] > 0


@needs_stats
def test_first_read_while_the_vcpu_runs_elsewhere_does_not_wait(vm):
    """KVM_GET_STATS_FD waits for the vCPU to leave KVM_RUN: a first read
    from another thread gives pyvt's counters at once instead of hanging on
    a guest that never exits; once the fd is open, KVM's come too."""
    import threading

    vm.memory.write(LOAD_ADDRESS, b"\xeb\xfe")  # jmp . (no exit, ever)
    cpu = vm.vcpu(0, mode="protected")
    cpu.regs.rip = LOAD_ADDRESS
    thread = threading.Thread(target=cpu.run, kwargs={"timeout": 60})
    thread.start()
    while cpu._running_thread is None:
        time.sleep(0.01)
    stats = cpu.stats
    assert set(stats) == set(RUN_LOOP_STATS)
    cpu.stop()
    thread.join(30)
    assert "exits" in cpu.stats
    # Opened now: a read while it runs has KVM's statistics too.
    thread = threading.Thread(target=cpu.run, kwargs={"timeout": 60})
    thread.start()
    while cpu._running_thread is None:
        time.sleep(0.01)
    assert "exits" in cpu.stats
    cpu.stop()
    thread.join(30)
