"""pyvt.kvm, issue 12 section B: memory slots v2, guest_memfd, memory
attributes, in-kernel devices and their attributes, memory encryption.

The ioctls newer than the build headers (Linux 6.1) are defined in
pyvt/_kvm_build.py; each test here needs what the running kernel offers and
skips naming the capability it lacks."""

import errno
import mmap
import os

import pytest

import pyvt
from pyvt.caps.collect import header_capabilities, query_kvm
from pyvt.kvm import DeviceFd, Kvm, ffi, lib

pytestmark = pytest.mark.requires_kvm

SIZE = 0x10000
CODE = 0x1000
# mov $0x3f8, %dx; mov 0x2000, %al; out %al, (%dx); hlt   (real mode)
SEND_BYTE_AT_0x2000 = bytes([0xBA, 0xF8, 0x03, 0xA0, 0x00, 0x20, 0xEE, 0xF4])


@pytest.fixture
def kvm():
    return Kvm(pyvt.select_backend())


@pytest.fixture
def vm(kvm):
    vm = kvm.create_vm()
    yield vm
    vm.close()


def _address(memory) -> int:
    return int(ffi.cast("uintptr_t", ffi.from_buffer(memory)))


def _run_until_hlt(vm) -> list:
    """Runs vCPU 0 in real mode from CODE; the bytes it wrote to port 0x3f8."""
    vcpu = vm.create_vcpu(0)
    try:
        sregs = vcpu.get_sregs()
        sregs.cs.base = sregs.cs.selector = 0
        sregs.ds.base = sregs.ds.selector = 0
        vcpu.set_sregs(sregs)
        regs = vcpu.get_regs()
        regs.rip, regs.rflags = CODE, 2
        vcpu.set_regs(regs)
        sent = []
        while True:
            reason = vcpu.run()
            run = vcpu.run_struct
            if reason == lib.KVM_EXIT_IO:
                sent.append(ffi.buffer(ffi.cast("char *", run) + run.io.data_offset, 1)[0])
            elif reason == lib.KVM_EXIT_HLT:
                return sent
            else:
                pytest.fail(f"unexpected exit {reason}")
    finally:
        vcpu.close()


def _guest_memory(data: bytes = b"S"):
    memory = mmap.mmap(-1, SIZE)
    memory[CODE:CODE + len(SEND_BYTE_AT_0x2000)] = SEND_BYTE_AT_0x2000
    memory[0x2000:0x2000 + len(data)] = data
    return memory


# -- capabilities newer than the headers --------------------------------------------

def test_newer_capabilities_are_known_and_reported(kvm):
    from pyvt._kvm_build import NEWER_CAPABILITIES

    for name, number, _version in NEWER_CAPABILITIES:
        assert pyvt.kvm.caps[name] == number
        assert kvm.check_extension(name) == kvm.check_extension(number)
    # pyvt caps reads them from pyvt.kvm.caps, or without the build from the header.
    assert {name: number for name, number, _ in NEWER_CAPABILITIES}.items() <= \
        header_capabilities().items()
    raw, _, _ = query_kvm(kvm.path)
    assert {name for name, _, _ in NEWER_CAPABILITIES} <= set(raw.capabilities)
    assert raw.capabilities["KVM_CAP_USER_MEMORY2"] == kvm.check_extension("USER_MEMORY2")


# -- KVM_SET_USER_MEMORY_REGION2 ------------------------------------------------------

@pytest.mark.requires_cap("USER_MEMORY2")
def test_guest_runs_from_user_memory_region2(vm):
    memory = _guest_memory(b"2")
    vm.set_user_memory_region2(0, 0, SIZE, _address(memory))
    assert _run_until_hlt(vm) == [b"2"]


@pytest.mark.requires_cap("USER_MEMORY2")
def test_user_memory_region2_validates(vm):
    memory = _guest_memory()
    with pytest.raises(pyvt.ArgumentError, match="slot"):
        vm.set_user_memory_region2(-1, 0, SIZE, _address(memory))
    with pytest.raises(pyvt.ArgumentTypeError, match="guest_memfd"):
        vm.set_user_memory_region2(0, 0, SIZE, _address(memory), guest_memfd="fd")
    with pytest.raises(pyvt.ArgumentError, match="guest_memfd_offset"):
        vm.set_user_memory_region2(0, 0, SIZE, _address(memory), guest_memfd_offset=1 << 64)
    # A guest_memfd slot whose fd is no guest_memfd: the kernel's refusal, explained.
    with open("/dev/null") as not_gmem:
        with pytest.raises(pyvt.KvmError, match="create_guest_memfd") as e:
            vm.set_user_memory_region2(0, 0, SIZE, _address(memory), lib.KVM_MEM_GUEST_MEMFD,
                                       guest_memfd=not_gmem.fileno())
    assert e.value.errno == errno.EINVAL
    # Nothing was lost: the slot can still be made.
    vm.set_user_memory_region2(0, 0, SIZE, _address(memory))
    assert _run_until_hlt(vm) == [b"S"]


# -- KVM_CREATE_GUEST_MEMFD -----------------------------------------------------------

def _require_gmem_flags(vm, flags: int) -> None:
    offered = vm.check_extension("KVM_CAP_GUEST_MEMFD_FLAGS")
    if flags & ~offered:
        pytest.skip(f"this VM's KVM_CAP_GUEST_MEMFD_FLAGS is {offered:#x}, not {flags:#x} "
                    "(GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED, Linux 6.18)")


@pytest.mark.requires_cap("USER_MEMORY2", "GUEST_MEMFD")
def test_guest_runs_from_guest_memfd(vm):
    flags = lib.GUEST_MEMFD_FLAG_MMAP | lib.GUEST_MEMFD_FLAG_INIT_SHARED
    _require_gmem_flags(vm, flags)
    gmem = vm.create_guest_memfd(SIZE, flags)
    try:
        assert os.fstat(gmem).st_size == SIZE
        memory = mmap.mmap(gmem, SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        memory[CODE:CODE + len(SEND_BYTE_AT_0x2000)] = SEND_BYTE_AT_0x2000
        memory[0x2000] = ord("G")
        vm.set_user_memory_region2(0, 0, SIZE, _address(memory), lib.KVM_MEM_GUEST_MEMFD,
                                   guest_memfd=gmem, guest_memfd_offset=0)
        assert _run_until_hlt(vm) == [b"G"]
    finally:
        os.close(gmem)


@pytest.mark.requires_cap("GUEST_MEMFD")
def test_create_guest_memfd_validates(vm):
    for size in (0, 100, SIZE + 1):
        with pytest.raises(pyvt.ArgumentError, match="multiple of"):
            vm.create_guest_memfd(size)
    with pytest.raises(pyvt.ArgumentError):
        vm.create_guest_memfd(-SIZE)
    with pytest.raises(pyvt.ArgumentTypeError):
        vm.create_guest_memfd("64K")
    with pytest.raises(pyvt.KvmError, match="KVM_CAP_GUEST_MEMFD_FLAGS"):
        vm.create_guest_memfd(SIZE, 1 << 40)
    gmem = vm.create_guest_memfd(SIZE)
    os.close(gmem)


# -- KVM_SET_MEMORY_ATTRIBUTES --------------------------------------------------------

def test_memory_attributes_refused_without_the_capability(vm):
    if vm.check_extension("KVM_CAP_MEMORY_ATTRIBUTES"):
        pytest.skip("this VM has KVM_CAP_MEMORY_ATTRIBUTES; the refusal is for hosts without")
    with pytest.raises(pyvt.KvmError, match="KVM_CAP_MEMORY_ATTRIBUTES"):
        vm.set_memory_attributes(0x2000, 0x1000, lib.KVM_MEMORY_ATTRIBUTE_PRIVATE)


def test_memory_attributes_validate(vm):
    with pytest.raises(pyvt.ArgumentError, match="whole pages"):
        vm.set_memory_attributes(0x2001, 0x1000, lib.KVM_MEMORY_ATTRIBUTE_PRIVATE)
    with pytest.raises(pyvt.ArgumentError, match="whole pages"):
        vm.set_memory_attributes(0x2000, 0, lib.KVM_MEMORY_ATTRIBUTE_PRIVATE)
    with pytest.raises(pyvt.ArgumentTypeError):
        vm.set_memory_attributes(0x2000, 0x1000, "private")


@pytest.mark.requires_cap("USER_MEMORY2", "GUEST_MEMFD", "VM_TYPES")
def test_private_page_is_read_from_guest_memfd(kvm):
    # A software-protected VM (KVM_X86_SW_PROTECTED_VM) takes memory attributes:
    # a page marked PRIVATE is read from the guest_memfd (zeros), not from the
    # shared user memory ('S').
    if not kvm.check_extension("KVM_CAP_VM_TYPES") & (1 << lib.KVM_X86_SW_PROTECTED_VM):
        pytest.skip(f"{kvm.path}'s KVM_CAP_VM_TYPES lacks KVM_X86_SW_PROTECTED_VM, the VM "
                    "type that takes KVM_SET_MEMORY_ATTRIBUTES without SEV/TDX")
    vm = kvm.create_vm(lib.KVM_X86_SW_PROTECTED_VM)
    try:
        supported = vm.check_extension("KVM_CAP_MEMORY_ATTRIBUTES")
        if not supported & lib.KVM_MEMORY_ATTRIBUTE_PRIVATE:
            pytest.skip("this VM's KVM_CAP_MEMORY_ATTRIBUTES lacks KVM_MEMORY_ATTRIBUTE_PRIVATE")
        memory = _guest_memory(b"S")
        gmem = vm.create_guest_memfd(SIZE)
        try:
            vm.set_user_memory_region2(0, 0, SIZE, _address(memory), lib.KVM_MEM_GUEST_MEMFD,
                                       guest_memfd=gmem)
            vm.set_memory_attributes(0x2000, 0x1000, lib.KVM_MEMORY_ATTRIBUTE_PRIVATE)
            assert _run_until_hlt(vm) == [b"\0"]
        finally:
            os.close(gmem)
    finally:
        vm.close()


# -- KVM_CREATE_DEVICE and device attributes ------------------------------------------

@pytest.fixture
def vfio_device(vm):
    try:
        assert vm.create_device(lib.KVM_DEV_TYPE_VFIO, test=True) is None
    except pyvt.KvmError as e:
        pytest.skip(f"this host's KVM cannot make KVM_DEV_TYPE_VFIO: {e}")
    device = vm.create_device(lib.KVM_DEV_TYPE_VFIO)
    yield device
    device.close()


@pytest.mark.requires_cap("DEVICE_CTRL")
def test_vfio_device_attributes(vfio_device):
    assert isinstance(vfio_device, DeviceFd) and "VFIO" in repr(vfio_device)
    assert vfio_device.has_device_attr(lib.KVM_DEV_VFIO_GROUP, lib.KVM_DEV_VFIO_GROUP_ADD)
    assert vfio_device.has_device_attr(lib.KVM_DEV_VFIO_GROUP, lib.KVM_DEV_VFIO_GROUP_DEL)
    assert not vfio_device.has_device_attr(lib.KVM_DEV_VFIO_GROUP, 99)
    assert not vfio_device.has_device_attr(99, 0)
    # The kvm-vfio device has no attribute to read: refused, saying so.
    with pytest.raises(pyvt.KvmError, match="does not let group 1 attribute 1 be read") as e:
        vfio_device.get_device_attr(lib.KVM_DEV_VFIO_GROUP, lib.KVM_DEV_VFIO_GROUP_ADD)
    assert e.value.errno == errno.EPERM
    # GROUP_ADD reads an fd (an __s32) from the data: the kernel sees the value
    # written (-1: EBADF; an open file that is no VFIO group: EINVAL).
    add = (lib.KVM_DEV_VFIO_GROUP, lib.KVM_DEV_VFIO_GROUP_ADD)
    with pytest.raises(pyvt.KvmError) as e:
        vfio_device.set_device_attr(*add, (-1).to_bytes(4, "little", signed=True))
    assert e.value.errno == errno.EBADF
    with open("/dev/null") as not_a_group:
        with pytest.raises(pyvt.KvmError) as e:
            vfio_device.set_device_attr(*add, not_a_group.fileno().to_bytes(4, "little"))
    assert e.value.errno == errno.EINVAL
    vfio_device.close()
    with pytest.raises(pyvt.ClosedError):
        vfio_device.has_device_attr(*add)


@pytest.mark.requires_cap("DEVICE_CTRL")
def test_create_device_refusals(vm):
    with pytest.raises(pyvt.KvmError, match="cannot make KVM_DEV_TYPE_ARM_VGIC_V3") as e:
        vm.create_device(lib.KVM_DEV_TYPE_ARM_VGIC_V3, test=True)
    assert e.value.errno == errno.ENODEV
    with pytest.raises(pyvt.ArgumentError):
        vm.create_device(-1)
    with pytest.raises(pyvt.ArgumentTypeError):
        vm.create_device("vfio")


@pytest.mark.requires_cap("DEVICE_CTRL")
def test_device_attr_arguments_validated(vfio_device):
    group, attr = lib.KVM_DEV_VFIO_GROUP, lib.KVM_DEV_VFIO_GROUP_ADD
    with pytest.raises(pyvt.ArgumentTypeError, match="bytes-like"):
        vfio_device.set_device_attr(group, attr, 5)
    with pytest.raises(pyvt.ArgumentError, match="empty"):
        vfio_device.set_device_attr(group, attr, b"")
    with pytest.raises(pyvt.ArgumentError):
        vfio_device.get_device_attr(group, attr, 0)
    with pytest.raises(pyvt.ArgumentTypeError):
        vfio_device.get_device_attr(group, attr, "8")
    with pytest.raises(pyvt.ArgumentError, match="group"):
        vfio_device.has_device_attr(-1, attr)
    with pytest.raises(pyvt.ArgumentError, match="attr"):
        vfio_device.has_device_attr(group, 1 << 64)
    assert vfio_device.has_device_attr(group, attr)  # still usable


def test_vm_device_attrs_refused_without_the_capability(vm):
    if vm.check_extension("KVM_CAP_VM_ATTRIBUTES"):
        pytest.skip("this VM has KVM_CAP_VM_ATTRIBUTES; the refusal is for hosts without")
    for call in (lambda: vm.has_device_attr(0, 0), lambda: vm.get_device_attr(0, 0),
                 lambda: vm.set_device_attr(0, 0, bytes(8))):
        with pytest.raises(pyvt.KvmError, match="lacks KVM_CAP_VM_ATTRIBUTES"):
            call()


@pytest.mark.requires_cap("VCPU_ATTRIBUTES")
def test_vcpu_has_the_tsc_offset_attribute(vm):
    vcpu = vm.create_vcpu(0)
    try:
        assert vcpu.has_device_attr(lib.KVM_VCPU_TSC_CTRL, lib.KVM_VCPU_TSC_OFFSET)
        assert not vcpu.has_device_attr(lib.KVM_VCPU_TSC_CTRL, 99)
        with pytest.raises(pyvt.KvmError, match="vCPU 0 has no group 7 attribute 0"):
            vcpu.get_device_attr(7, 0)
        # Shorter than the attribute's __u64: padded and cut, never overrun.
        tsc = (lib.KVM_VCPU_TSC_CTRL, lib.KVM_VCPU_TSC_OFFSET)
        assert len(vcpu.get_device_attr(*tsc, size=1)) == 1
        vcpu.set_device_attr(*tsc, b"\0")
    finally:
        vcpu.close()


@pytest.mark.requires_cap("VCPU_ATTRIBUTES")
def test_tsc_offset_attribute_is_what_the_guest_reads(vm):
    if os.path.exists("/sys/module/kvm_pvm"):
        pytest.skip("PVM (/sys/module/kvm_pvm) runs guests on the host's TSC: it accepts "
                    "KVM_VCPU_TSC_OFFSET but reads it back as 0 and RDTSC ignores it")
    memory = mmap.mmap(-1, SIZE)
    memory[CODE:CODE + 3] = bytes([0x0F, 0x31, 0xF4])  # rdtsc; hlt
    vm.set_user_memory_region(0, 0, SIZE, _address(memory))
    vcpu = vm.create_vcpu(0)
    try:
        sregs = vcpu.get_sregs()
        sregs.cs.base = sregs.cs.selector = 0
        vcpu.set_sregs(sregs)
        regs = vcpu.get_regs()
        regs.rip, regs.rflags = CODE, 2
        vcpu.set_regs(regs)
        offset = 1 << 62
        group, attr = lib.KVM_VCPU_TSC_CTRL, lib.KVM_VCPU_TSC_OFFSET
        vcpu.set_device_attr(group, attr, offset.to_bytes(8, "little"))
        assert int.from_bytes(vcpu.get_device_attr(group, attr), "little") == offset
        assert vcpu.run() == lib.KVM_EXIT_HLT
        regs = vcpu.get_regs()
        assert (regs.rdx << 32 | regs.rax & 0xFFFFFFFF) >= offset
    finally:
        vcpu.close()


# -- memory encryption (SEV/TDX hosts only) -------------------------------------------

def test_memory_encryption_refused_on_a_host_without_it(vm):
    if pyvt.kvm._memory_encryption_host():
        pytest.skip("this host has SEV or TDX enabled; the refusal is for hosts without")
    calls = {
        "KVM_MEMORY_ENCRYPT_OP": lambda: vm.memory_encrypt_op(ffi.new("struct kvm_sev_cmd *")),
        "KVM_MEMORY_ENCRYPT_REG_REGION": lambda: vm.memory_encrypt_reg_region(0x10000, 0x1000),
        "KVM_MEMORY_ENCRYPT_UNREG_REGION": lambda: vm.memory_encrypt_unreg_region(0x10000, 0x1000),
    }
    for name, call in calls.items():
        with pytest.raises(pyvt.KvmError, match=f"{name} is for hosts with memory encryption"):
            call()


def test_memory_encryption_arguments_validated(vm):
    with pytest.raises(pyvt.ArgumentTypeError, match="kvm_sev_cmd"):
        vm.memory_encrypt_op(42)
    with pytest.raises(pyvt.ArgumentTypeError, match="kvm_sev_cmd"):
        vm.memory_encrypt_op(b"read-only bytes")
    with pytest.raises(pyvt.ArgumentError, match="at least 24 bytes"):
        vm.memory_encrypt_op(bytearray(8))
    with pytest.raises(pyvt.ArgumentError, match="at least 24 bytes"):
        vm.memory_encrypt_op(ffi.new("__u32 *"))
    with pytest.raises(pyvt.ArgumentError, match="size"):
        vm.memory_encrypt_reg_region(0x10000, 0)
    with pytest.raises(pyvt.ArgumentError, match="addr"):
        vm.memory_encrypt_unreg_region(-1, 0x1000)
