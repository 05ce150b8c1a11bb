"""The VM file descriptor of the thin layer: :class:`VmFd` (re-exported by
:mod:`pyvt.kvm`)."""

from __future__ import annotations

import errno
import weakref
from typing import TYPE_CHECKING, List, Optional, Union

from ._kvm import ffi, lib
from .errors import (
    ArgumentError,
    ArgumentTypeError,
    KvmError,
)
from .kvm_base import (caps, PAGE_SIZE, _Fd, _arg, _as_list, _cap_number, _deprecated, _enable_cap_struct, _require_cap, _struct_arg, _struct_pointer, _u32, _u64, _uint)
# In-kernel devices and binary statistics build on _Fd (issue 12, sections B and D).
from .kvm_device import DeviceFd
from .kvm_device import create_device as _create_device
from .kvm_device import get_device_attr as _get_device_attr
from .kvm_device import has_device_attr as _has_device_attr
from .kvm_device import set_device_attr as _set_device_attr
from .kvm_stats import StatsFd
from .kvm_stats import open_stats_fd as _open_stats_fd
from .kvm_vcpu import VcpuFd

if TYPE_CHECKING:
    from .dirty_ring import DirtyRing
    from .kvm_system import Kvm


class VmFd(_Fd):
    """A VM file descriptor, made by :meth:`Kvm.create_vm`."""

    def __init__(self, kvm: Kvm, fd: int):
        self.kvm = kvm
        self._fd = fd
        #: Set once KVM_CREATE_IRQCHIP / KVM_CREATE_PIT2 succeeded.
        self.has_irqchip = False
        self.has_pit = False

    def __repr__(self) -> str:
        return f"<VmFd fd={self._fd} on {self.kvm.path}>"

    def check_extension(self, cap: Union[int, str]) -> int:
        """``KVM_CHECK_EXTENSION`` on the VM fd (per-VM answers)."""
        return self._ioctl("KVM_CHECK_EXTENSION", lib.KVM_CHECK_EXTENSION,
                           _arg(_cap_number(cap)))

    def set_user_memory_region(self, slot: int, guest_phys_addr: int,
                               memory_size: int, userspace_addr: int,
                               flags: int = 0) -> None:
        """``KVM_SET_USER_MEMORY_REGION``.

        Safety: ``userspace_addr`` must stay mapped for ``memory_size`` bytes
        as long as the slot exists; the guest reads and writes it.
        """
        region = ffi.new("struct kvm_userspace_memory_region *", {
            "slot": _u32(slot, "slot"), "flags": _u32(flags, "flags"),
            "guest_phys_addr": _u64(guest_phys_addr, "guest_phys_addr"),
            "memory_size": _u64(memory_size, "memory_size"),
            "userspace_addr": _u64(userspace_addr, "userspace_addr"),
        })
        self._ioctl("KVM_SET_USER_MEMORY_REGION", lib.KVM_SET_USER_MEMORY_REGION, region)

    def create_vcpu(self, index: int) -> "VcpuFd":
        """``KVM_CREATE_VCPU``, then mmap of its ``struct kvm_run``."""
        fd = self._ioctl("KVM_CREATE_VCPU", lib.KVM_CREATE_VCPU,
                         _arg(_u32(index, "vCPU index")))
        vcpu = VcpuFd(self, fd, index)
        self._vcpu_created(vcpu)
        return vcpu

    def set_tss_addr(self, address: int) -> None:
        """``KVM_SET_TSS_ADDR``: three pages KVM may use for real mode on VMX."""
        self._ioctl("KVM_SET_TSS_ADDR", lib.KVM_SET_TSS_ADDR, _arg(_u32(address, "address")))

    def set_identity_map_addr(self, address: int) -> None:
        """``KVM_SET_IDENTITY_MAP_ADDR``."""
        addr = ffi.new("__u64 *", _u64(address, "address"))
        self._ioctl("KVM_SET_IDENTITY_MAP_ADDR", lib.KVM_SET_IDENTITY_MAP_ADDR, addr)

    def create_irqchip(self) -> None:
        """``KVM_CREATE_IRQCHIP``: in-kernel PIC, IOAPIC and LAPICs."""
        self._ioctl("KVM_CREATE_IRQCHIP", lib.KVM_CREATE_IRQCHIP)
        self.has_irqchip = True

    def create_pit2(self, flags: int = 0) -> None:
        """``KVM_CREATE_PIT2``: the in-kernel i8254 timer."""
        config = ffi.new("struct kvm_pit_config *", {"flags": _u32(flags, "flags")})
        self._ioctl("KVM_CREATE_PIT2", lib.KVM_CREATE_PIT2, config)
        self.has_pit = True

    def get_irqchip(self, chip_id: int):
        """``KVM_GET_IRQCHIP`` -> ``struct kvm_irqchip``: the state of one
        in-kernel interrupt controller (``KVM_IRQCHIP_PIC_MASTER``,
        ``_PIC_SLAVE``, ``_IOAPIC``); :func:`struct_bytes` gives its bytes."""
        chip = ffi.new("struct kvm_irqchip *", {"chip_id": _u32(chip_id, "chip_id")})
        self._ioctl("KVM_GET_IRQCHIP", lib.KVM_GET_IRQCHIP, chip)
        return chip

    def set_irqchip(self, state) -> None:
        """``KVM_SET_IRQCHIP`` from :meth:`get_irqchip`'s struct (or its bytes)."""
        self._ioctl("KVM_SET_IRQCHIP", lib.KVM_SET_IRQCHIP,
                    _struct_arg(state, "struct kvm_irqchip", "KVM_SET_IRQCHIP"))

    def get_pit2(self):
        """``KVM_GET_PIT2`` -> ``struct kvm_pit_state2``: the in-kernel PIT's state."""
        pit = ffi.new("struct kvm_pit_state2 *")
        self._ioctl("KVM_GET_PIT2", lib.KVM_GET_PIT2, pit)
        return pit

    def set_pit2(self, state) -> None:
        """``KVM_SET_PIT2`` from :meth:`get_pit2`'s struct (or its bytes)."""
        self._ioctl("KVM_SET_PIT2", lib.KVM_SET_PIT2,
                    _struct_arg(state, "struct kvm_pit_state2", "KVM_SET_PIT2"))

    def irq_line(self, irq: int, level: int) -> None:
        """``KVM_IRQ_LINE``: drive an interrupt line of the in-kernel irqchip."""
        line = ffi.new("struct kvm_irq_level *", {"irq": _u32(irq, "irq"),
                                                  "level": 1 if level else 0})
        self._ioctl("KVM_IRQ_LINE", lib.KVM_IRQ_LINE, line)

    def register_ioeventfd(self, fd: int, addr: int, length: int = 0, *, pio: bool = False,
                           datamatch: Optional[int] = None) -> None:
        """``KVM_IOEVENTFD`` (4.59): a guest write of ``length`` bytes (0: any)
        to ``addr`` (a port with ``pio``), of value ``datamatch`` if given,
        signals eventfd ``fd`` instead of exiting."""
        self._ioeventfd(fd, addr, length, pio, datamatch, 0)

    def unregister_ioeventfd(self, fd: int, addr: int, length: int = 0, *, pio: bool = False,
                             datamatch: Optional[int] = None) -> None:
        """``KVM_IOEVENTFD`` with ``KVM_IOEVENTFD_FLAG_DEASSIGN``: undoes the
        :meth:`register_ioeventfd` made with the same arguments."""
        self._ioeventfd(fd, addr, length, pio, datamatch, lib.KVM_IOEVENTFD_FLAG_DEASSIGN)

    def _ioeventfd(self, fd: int, addr: int, length: int, pio: bool,
                   datamatch: Optional[int], flags: int) -> None:
        if pio:
            flags |= lib.KVM_IOEVENTFD_FLAG_PIO
        if datamatch is not None:
            flags |= lib.KVM_IOEVENTFD_FLAG_DATAMATCH
        event = ffi.new("struct kvm_ioeventfd *", {
            "datamatch": _u64(datamatch or 0, "datamatch"),
            "addr": _u64(addr, "addr"), "len": _u32(length, "length"),
            "fd": _uint(fd, "fd", 31), "flags": flags,
        })
        self._ioctl("KVM_IOEVENTFD", lib.KVM_IOEVENTFD, event)

    def ioeventfd(self, fd: int, addr: int, length: int = 0, *, pio: bool = False,
                  datamatch: Optional[int] = None, deassign: bool = False) -> None:
        """Deprecated: :meth:`register_ioeventfd`, or with ``deassign=True``
        :meth:`unregister_ioeventfd`."""
        _deprecated("VmFd.ioeventfd(..., deassign=)",
                    "register_ioeventfd() / unregister_ioeventfd()")
        register = self.unregister_ioeventfd if deassign else self.register_ioeventfd
        register(fd, addr, length, pio=pio, datamatch=datamatch)

    def register_irqfd(self, fd: int, gsi: int, *, resamplefd: Optional[int] = None) -> None:
        """``KVM_IRQFD`` (4.75): signalling eventfd ``fd`` raises interrupt ``gsi``.

        With ``resamplefd`` (KVM_IRQFD_FLAG_RESAMPLE, KVM_CAP_IRQFD_RESAMPLE)
        the line is level-triggered: it stays asserted until the guest EOIs
        the interrupt, which de-asserts it and signals eventfd ``resamplefd``
        (the device then re-raises ``fd`` if it still needs service)."""
        flags = 0 if resamplefd is None else lib.KVM_IRQFD_FLAG_RESAMPLE
        self._irqfd(fd, gsi, flags, 0 if resamplefd is None else _u32(resamplefd, "resamplefd"))

    def unregister_irqfd(self, fd: int, gsi: int) -> None:
        """``KVM_IRQFD`` with ``KVM_IRQFD_FLAG_DEASSIGN``: eventfd ``fd`` no
        longer raises ``gsi`` (its resampler, if any, goes with it)."""
        self._irqfd(fd, gsi, lib.KVM_IRQFD_FLAG_DEASSIGN, 0)

    def _irqfd(self, fd: int, gsi: int, flags: int, resamplefd: int) -> None:
        irqfd = ffi.new("struct kvm_irqfd *", {
            "fd": _u32(fd, "fd"), "gsi": _u32(gsi, "gsi"), "flags": flags,
            "resamplefd": resamplefd,
        })
        self._ioctl("KVM_IRQFD", lib.KVM_IRQFD, irqfd)

    def irqfd(self, fd: int, gsi: int, *, deassign: bool = False,
              resamplefd: Optional[int] = None) -> None:
        """Deprecated: :meth:`register_irqfd`, or with ``deassign=True``
        :meth:`unregister_irqfd`."""
        _deprecated("VmFd.irqfd(..., deassign=)", "register_irqfd() / unregister_irqfd()")
        if not deassign:
            self.register_irqfd(fd, gsi, resamplefd=resamplefd)
        elif resamplefd is not None:
            raise ArgumentError("KVM_IRQFD: deassign takes no resamplefd "
                                "(deassigning fd from gsi drops its resampler too)")
        else:
            self.unregister_irqfd(fd, gsi)

    def get_dirty_log(self, slot: int, pages: int) -> bytes:
        """``KVM_GET_DIRTY_LOG``: the slot's dirty bitmap (one bit per page)."""
        bitmap = ffi.new("uint64_t[]", max(1, (_u32(pages, "pages") + 63) // 64))
        log = ffi.new("struct kvm_dirty_log *", {"slot": _u32(slot, "slot"),
                                                 "dirty_bitmap": bitmap})
        self._ioctl("KVM_GET_DIRTY_LOG", lib.KVM_GET_DIRTY_LOG, log)
        return bytes(ffi.buffer(bitmap))

    def enable_cap(self, cap: Union[int, str], *args: int, flags: int = 0) -> None:
        """``KVM_ENABLE_CAP`` on the VM."""
        self._ioctl("KVM_ENABLE_CAP", lib.KVM_ENABLE_CAP, _enable_cap_struct(cap, args, flags))

    def register_coalesced_mmio(self, addr: int, size: int, pio: bool = False) -> None:
        """``KVM_REGISTER_COALESCED_MMIO``: guest writes there are queued in a
        ring instead of exiting (``pio=True`` needs KVM_CAP_COALESCED_PIO)."""
        zone = ffi.new("struct kvm_coalesced_mmio_zone *", {
            "addr": _u64(addr, "addr"), "size": _u32(size, "size"), "pio": int(pio)})
        self._ioctl("KVM_REGISTER_COALESCED_MMIO", lib.KVM_REGISTER_COALESCED_MMIO, zone)

    def unregister_coalesced_mmio(self, addr: int, size: int, pio: bool = False) -> None:
        """``KVM_UNREGISTER_COALESCED_MMIO``."""
        zone = ffi.new("struct kvm_coalesced_mmio_zone *", {
            "addr": _u64(addr, "addr"), "size": _u32(size, "size"), "pio": int(pio)})
        self._ioctl("KVM_UNREGISTER_COALESCED_MMIO", lib.KVM_UNREGISTER_COALESCED_MMIO, zone)

    # -- interrupts, MSI and GSI routing, translation, clocks, nested state, sregs2 ---

    def get_clock(self):
        """``KVM_GET_CLOCK`` (4.29, KVM_CAP_ADJUST_CLOCK) -> ``struct kvm_clock_data``:
        the guests' kvmclock in ns (``clock``), with ``realtime`` and
        ``host_tsc`` where ``flags`` has KVM_CLOCK_REALTIME / KVM_CLOCK_HOST_TSC."""
        _require_cap(self.kvm, "KVM_CAP_ADJUST_CLOCK", "KVM_GET_CLOCK")
        data = ffi.new("struct kvm_clock_data *")
        self._ioctl("KVM_GET_CLOCK", lib.KVM_GET_CLOCK, data)
        return data

    def set_clock(self, clock: Union[int, object], flags: int = 0, realtime: int = 0) -> None:
        """``KVM_SET_CLOCK`` (4.30): sets the kvmclock to ``clock`` ns, or from a
        ``struct kvm_clock_data`` (as :meth:`get_clock` returns, whose flags
        and realtime are used).  With ``flags=KVM_CLOCK_REALTIME`` KVM adds the
        time elapsed since ``realtime`` (CLOCK_REALTIME ns)."""
        _require_cap(self.kvm, "KVM_CAP_ADJUST_CLOCK", "KVM_SET_CLOCK")
        if isinstance(clock, ffi.CData):
            data = _struct_pointer(clock, "struct kvm_clock_data", "KVM_SET_CLOCK")
        else:
            data = ffi.new("struct kvm_clock_data *", {
                "clock": _u64(clock, "clock"), "flags": _u32(flags, "flags"),
                "realtime": _u64(realtime, "realtime")})
        self._ioctl("KVM_SET_CLOCK", lib.KVM_SET_CLOCK, data)

    def signal_msi(self, address: int, data: int, flags: int = 0, devid: int = 0) -> int:
        """``KVM_SIGNAL_MSI`` (4.71, KVM_CAP_SIGNAL_MSI): delivers one MSI
        message to the in-kernel LAPICs.  Returns how many LAPICs took it
        (0: the guest blocked it, e.g. a software-disabled LAPIC)."""
        _require_cap(self.kvm, "KVM_CAP_SIGNAL_MSI", "KVM_SIGNAL_MSI")
        address = _u64(address, "MSI address")
        msi = ffi.new("struct kvm_msi *", {
            "address_lo": address & 0xFFFFFFFF, "address_hi": address >> 32,
            "data": _u32(data, "MSI data"), "flags": _u32(flags, "flags"),
            "devid": _u32(devid, "devid")})
        return self._ioctl("KVM_SIGNAL_MSI", lib.KVM_SIGNAL_MSI, msi,
                           hint="no LAPIC took it: the VM needs the in-kernel irqchip "
                                "(KVM_CREATE_IRQCHIP) and a vCPU whose APIC ID the "
                                "address names")

    def set_gsi_routing(self, entries) -> None:
        """``KVM_SET_GSI_ROUTING`` (4.52, KVM_CAP_IRQ_ROUTING): replaces the whole
        GSI routing table (the irqchip's default routes too: see
        :func:`pyvt.gsi_routes.irqchip_routes`).  ``entries`` is an iterable of
        :class:`pyvt.gsi_routes.IrqchipRoute`, :class:`pyvt.gsi_routes.MsiRoute`
        or cffi ``struct kvm_irq_routing_entry``; or a whole cffi
        ``struct kvm_irq_routing *``.  Needs the in-kernel irqchip."""
        from .gsi_routes import routing_table

        max_gsi = _require_cap(self.kvm, "KVM_CAP_IRQ_ROUTING", "KVM_SET_GSI_ROUTING")
        if isinstance(entries, ffi.CData) and ffi.typeof(entries) is ffi.typeof(
                "struct kvm_irq_routing *"):
            table = entries
        else:
            table = routing_table(entries, max_gsi)
        self._ioctl("KVM_SET_GSI_ROUTING", lib.KVM_SET_GSI_ROUTING, table,
                    hint="routes need the in-kernel irqchip (KVM_CREATE_IRQCHIP), "
                         "valid irqchip pins and GSIs below KVM_CAP_IRQ_ROUTING")

    # -- memory slots v2, guest_memfd, devices, memory encryption --------------

    def set_user_memory_region2(self, slot: int, guest_phys_addr: int, memory_size: int,
                                userspace_addr: int, flags: int = 0, *,
                                guest_memfd: int = 0, guest_memfd_offset: int = 0) -> None:
        """``KVM_SET_USER_MEMORY_REGION2`` (api.rst 4.140, Linux 6.8; needs
        KVM_CAP_USER_MEMORY2): :meth:`set_user_memory_region` plus a
        guest_memfd range, used where ``flags`` has ``KVM_MEM_GUEST_MEMFD``.

        Safety: as for :meth:`set_user_memory_region`, ``userspace_addr``
        must stay mapped for ``memory_size`` bytes as long as the slot exists.
        """
        region = ffi.new("struct kvm_userspace_memory_region2 *", {
            "slot": _u32(slot, "slot"), "flags": _u32(flags, "flags"),
            "guest_phys_addr": _u64(guest_phys_addr, "guest_phys_addr"),
            "memory_size": _u64(memory_size, "memory_size"),
            "userspace_addr": _u64(userspace_addr, "userspace_addr"),
            "guest_memfd_offset": _u64(guest_memfd_offset, "guest_memfd_offset"),
            "guest_memfd": _u32(guest_memfd, "guest_memfd"),
        })
        _require_cap(self, "KVM_CAP_USER_MEMORY2", "KVM_SET_USER_MEMORY_REGION2")
        hint = ""
        if flags & lib.KVM_MEM_GUEST_MEMFD:
            hint = ("a KVM_MEM_GUEST_MEMFD slot needs guest_memfd from this VM's "
                    "create_guest_memfd(), a page-aligned range inside it not bound to "
                    "another slot, and a VM type that takes guest_memfd (KVM_CAP_GUEST_MEMFD)")
        self._ioctl("KVM_SET_USER_MEMORY_REGION2", lib.KVM_SET_USER_MEMORY_REGION2, region,
                    hint=hint)

    def create_guest_memfd(self, size: int, flags: int = 0) -> int:
        """``KVM_CREATE_GUEST_MEMFD`` (api.rst 4.142, Linux 6.8; needs
        KVM_CAP_GUEST_MEMFD): a new guest_memfd file of ``size`` bytes (a
        multiple of the page size) for this VM's private memory.  ``flags``
        are ``GUEST_MEMFD_FLAG_*`` (those KVM_CAP_GUEST_MEMFD_FLAGS lists;
        ``GUEST_MEMFD_FLAG_MMAP`` lets the host mmap it, Linux 6.18).

        Returns the file descriptor; the caller owns it (``os.close``).
        """
        size = _u64(size, "size")
        flags = _u64(flags, "flags")
        if size == 0 or size % PAGE_SIZE:
            raise ArgumentError(f"a guest_memfd's size must be a positive multiple of "
                                f"{PAGE_SIZE} bytes, not {size}")
        _require_cap(self, "KVM_CAP_GUEST_MEMFD", "KVM_CREATE_GUEST_MEMFD")
        if flags:
            supported = self.check_extension("KVM_CAP_GUEST_MEMFD_FLAGS")
            if flags & ~supported:
                raise KvmError("KVM_CREATE_GUEST_MEMFD", errno.EINVAL,
                               f"flags {flags:#x}: this VM's KVM_CAP_GUEST_MEMFD_FLAGS offers "
                               f"only {supported:#x}")
        create = ffi.new("struct kvm_create_guest_memfd *", {"size": size, "flags": flags})
        return self._ioctl("KVM_CREATE_GUEST_MEMFD", lib.KVM_CREATE_GUEST_MEMFD, create)

    def set_memory_attributes(self, address: int, size: int, attributes: int,
                              flags: int = 0) -> None:
        """``KVM_SET_MEMORY_ATTRIBUTES`` (api.rst 4.141, Linux 6.8; needs
        KVM_CAP_MEMORY_ATTRIBUTES): sets ``attributes`` (``KVM_MEMORY_ATTRIBUTE_*``,
        e.g. PRIVATE) on the guest-physical pages ``[address, address + size)``.
        ``flags`` must be 0."""
        attrs = ffi.new("struct kvm_memory_attributes *", {
            "address": _u64(address, "address"), "size": _u64(size, "size"),
            "attributes": _u64(attributes, "attributes"), "flags": _u64(flags, "flags"),
        })
        if size == 0 or size % PAGE_SIZE or address % PAGE_SIZE:
            raise ArgumentError(f"memory attributes cover whole pages: address {address:#x} "
                                f"and size {size:#x} must be multiples of {PAGE_SIZE:#x}, "
                                f"the size not 0")
        supported = _require_cap(self, "KVM_CAP_MEMORY_ATTRIBUTES", "KVM_SET_MEMORY_ATTRIBUTES")
        if attributes & ~supported:
            raise KvmError("KVM_SET_MEMORY_ATTRIBUTES", errno.EINVAL,
                           f"attributes {attributes:#x}: this VM's KVM_CAP_MEMORY_ATTRIBUTES "
                           f"offers only {supported:#x}")
        self._ioctl("KVM_SET_MEMORY_ATTRIBUTES", lib.KVM_SET_MEMORY_ATTRIBUTES, attrs)

    def _memory_encrypt(self, name: str, request: int, arg) -> int:
        try:
            return self._ioctl(name, request, arg)
        except KvmError as e:
            if e.errno in (errno.ENOTTY, errno.EINVAL) and not _memory_encryption_host():
                raise KvmError(name, e.errno,
                               f"{name} is for hosts with memory encryption (AMD SEV/SEV-ES/"
                               f"SEV-SNP with kvm_amd sev=1, or Intel TDX): {self.kvm.path} "
                               f"has none") from None
            raise

    def memory_encrypt_op(self, command):
        """``KVM_MEMORY_ENCRYPT_OP`` (api.rst 4.110; SEV or TDX hosts only): runs
        a vendor command, ``command`` being a cffi pointer to its struct
        (``struct kvm_sev_cmd *`` on SEV) or a writable buffer holding it.
        Returns ``command``, which the kernel may have written to (e.g. ``error``)."""
        if isinstance(command, ffi.CData) and ffi.typeof(command).kind == "pointer":
            arg, size = command, ffi.sizeof(ffi.typeof(command).item)
        else:
            try:
                arg = ffi.from_buffer(command, require_writable=True)
            except (TypeError, BufferError):
                raise ArgumentTypeError(
                    f"KVM_MEMORY_ENCRYPT_OP takes a cffi pointer to the command struct "
                    f"(struct kvm_sev_cmd * on SEV) or a writable buffer, not {command!r}") from None
            size = len(arg)
        # The kernel reads and writes a whole command (SEV's and TDX's are both
        # this size): a smaller one would let it run past the end.
        if size < ffi.sizeof("struct kvm_sev_cmd"):
            raise ArgumentError(f"a KVM_MEMORY_ENCRYPT_OP command is at least "
                                f"{ffi.sizeof('struct kvm_sev_cmd')} bytes, not {size}")
        self._memory_encrypt("KVM_MEMORY_ENCRYPT_OP", lib.KVM_MEMORY_ENCRYPT_OP, arg)
        return command

    def _enc_region(self, addr: int, size: int):
        if _u64(size, "size") == 0:
            raise ArgumentError("an encrypted region's size must not be 0")
        return ffi.new("struct kvm_enc_region *", {"addr": _u64(addr, "addr"), "size": size})

    def memory_encrypt_reg_region(self, addr: int, size: int) -> None:
        """``KVM_MEMORY_ENCRYPT_REG_REGION`` (api.rst 4.111; SEV hosts only): pins
        the host memory ``[addr, addr + size)`` that holds encrypted guest memory."""
        self._memory_encrypt("KVM_MEMORY_ENCRYPT_REG_REGION",
                             lib.KVM_MEMORY_ENCRYPT_REG_REGION, self._enc_region(addr, size))

    def memory_encrypt_unreg_region(self, addr: int, size: int) -> None:
        """``KVM_MEMORY_ENCRYPT_UNREG_REGION`` (api.rst 4.112; SEV hosts only):
        undoes :meth:`memory_encrypt_reg_region` for the same range."""
        self._memory_encrypt("KVM_MEMORY_ENCRYPT_UNREG_REGION",
                             lib.KVM_MEMORY_ENCRYPT_UNREG_REGION, self._enc_region(addr, size))

    def create_device(self, device_type: int, test: bool = False) -> "Optional[DeviceFd]":
        """``KVM_CREATE_DEVICE`` (api.rst 4.79; needs KVM_CAP_DEVICE_CTRL): a new
        in-kernel device of ``device_type`` (``KVM_DEV_TYPE_*``) as a
        :class:`DeviceFd`.  ``test=True`` sets ``KVM_CREATE_DEVICE_TEST``: it
        only checks that the host can make that type (raising if not) and
        returns None."""
        return _create_device(self, device_type, test)

    def set_device_attr(self, group: int, attr: int, data=None, *, flags: int = 0) -> None:
        """``KVM_SET_DEVICE_ATTR`` on the VM (api.rst 4.80; needs
        KVM_CAP_VM_ATTRIBUTES): writes ``data`` (bytes-like, or None)."""
        _require_cap(self, "KVM_CAP_VM_ATTRIBUTES", "KVM_SET_DEVICE_ATTR")
        _set_device_attr(self, group, attr, data, flags=flags, where="this VM")

    def get_device_attr(self, group: int, attr: int, size: int = 8, *, flags: int = 0) -> bytes:
        """``KVM_GET_DEVICE_ATTR`` on the VM (api.rst 4.80; needs
        KVM_CAP_VM_ATTRIBUTES): the attribute's ``size`` bytes."""
        _require_cap(self, "KVM_CAP_VM_ATTRIBUTES", "KVM_GET_DEVICE_ATTR")
        return _get_device_attr(self, group, attr, size, flags=flags, where="this VM")

    def has_device_attr(self, group: int, attr: int, *, flags: int = 0) -> bool:
        """``KVM_HAS_DEVICE_ATTR`` on the VM (api.rst 4.81; needs
        KVM_CAP_VM_ATTRIBUTES): whether the VM has that attribute."""
        _require_cap(self, "KVM_CAP_VM_ATTRIBUTES", "KVM_HAS_DEVICE_ATTR")
        return _has_device_attr(self, group, attr, flags=flags, where="this VM")

    # -- the dirty ring --------------------------------------------------------

    #: The dirty ring's size in bytes once enable_dirty_log_ring() succeeded, else 0.
    dirty_ring_size = 0

    def enable_dirty_log_ring(self, size: int) -> str:
        """``KVM_ENABLE_CAP`` of ``KVM_CAP_DIRTY_LOG_RING_ACQ_REL`` (or of
        ``KVM_CAP_DIRTY_LOG_RING`` where the kernel lacks it) with a ring of
        ``size`` bytes per vCPU (``size // 16`` struct kvm_dirty_gfn): see
        "8.29 KVM_CAP_DIRTY_LOG_RING/KVM_CAP_DIRTY_LOG_RING_ACQ_REL".

        Only before the VM has any vCPU; ``size`` is a power of two from
        the page size up to what ``KVM_CHECK_EXTENSION`` answers for the
        capability (the largest ring in bytes).  From then on KVM logs
        guest writes to slots with ``KVM_MEM_LOG_DIRTY_PAGES`` in the vCPUs'
        rings (:meth:`VcpuFd.dirty_ring`), never in a bitmap:
        ``KVM_GET_DIRTY_LOG`` fails.  Returns the capability's name.
        """
        if isinstance(size, bool) or not isinstance(size, int):
            raise ArgumentTypeError(f"the dirty ring size must be an int (bytes), not {size!r}")
        if self.dirty_ring_size:
            raise ArgumentError(f"this VM has a dirty ring already ({self.dirty_ring_size} "
                                "bytes); KVM sets it once")
        if self._vcpu_fds:
            raise ArgumentError("the dirty ring must be enabled before the VM's first vCPU "
                                f"is created; this VM has {len(self._vcpu_fds)}: enable it "
                                "right after create_vm() (pyvt.Vm(dirty_ring=...))")
        name = next((cap for cap in ("KVM_CAP_DIRTY_LOG_RING_ACQ_REL", "KVM_CAP_DIRTY_LOG_RING")
                     if cap in caps and self.check_extension(cap)), None)
        if name is None:
            raise KvmError("KVM_ENABLE_CAP", errno.EOPNOTSUPP,
                           f"{self.kvm.path} has no dirty ring (KVM_CAP_DIRTY_LOG_RING); "
                           "use the dirty bitmap (KVM_GET_DIRTY_LOG)")
        largest = self.check_extension(name)
        if size < PAGE_SIZE or size > largest or size & (size - 1):
            raise ArgumentError(f"the dirty ring size must be a power of two from {PAGE_SIZE} "
                                f"to {largest} bytes ({name}), not {size}")
        try:
            self.enable_cap(name, size)
        except KvmError as e:
            raise KvmError("KVM_ENABLE_CAP", e.errno,
                           f"{name} with {size} bytes refused (KVM refuses a vCPU made "
                           "before it, and a ring too small for its reserved entries)") from None
        self.dirty_ring_size = size
        return name

    def reset_dirty_rings(self) -> int:
        """``KVM_RESET_DIRTY_RINGS`` (see 8.29): KVM re-protects the pages of
        every harvested ring entry and frees the entries.  Returns how many."""
        return self._ioctl("KVM_RESET_DIRTY_RINGS", lib.KVM_RESET_DIRTY_RINGS,
                           hint="the VM needs KVM_CAP_DIRTY_LOG_RING (enable_dirty_log_ring)")

    @property
    def _vcpu_fds(self) -> List["VcpuFd"]:
        """The open vCPU fds this VmFd created (in creation order)."""
        fds = self.__dict__.setdefault("_vcpu_refs", [])
        alive = [v for v in (ref() for ref in fds) if v is not None and not v.closed]
        fds[:] = [weakref.ref(v) for v in alive]
        return alive

    def _vcpu_created(self, vcpu: "VcpuFd") -> None:
        """Keeps ``vcpu`` (weakly) and maps its dirty ring if the VM has one:
        harvesting must see every vCPU's ring."""
        self.__dict__.setdefault("_vcpu_refs", []).append(weakref.ref(vcpu))
        if self.dirty_ring_size:
            try:
                ring = vcpu.dirty_ring()
            except BaseException:
                vcpu.close()
                raise
            self.__dict__.setdefault("_rings", []).append(ring)

    def dirty_rings(self) -> List["DirtyRing"]:
        """The dirty rings of this VM's open vCPUs (empty without a ring)."""
        rings = self.__dict__.get("_rings", [])
        if any(ring.closed for ring in rings):
            rings[:] = [ring for ring in rings if not ring.closed]
        return list(rings)

    # -- binary statistics -----------------------------------------------------

    def get_stats_fd(self) -> "StatsFd":
        """``KVM_GET_STATS_FD`` on the VM (api.rst "4.133 KVM_GET_STATS_FD",
        needs KVM_CAP_BINARY_STATS_FD): a new :class:`pyvt.kvm_stats.StatsFd`
        of the VM's statistics, with its header and descriptors decoded.
        The caller owns it: close it (or use ``with``) when done."""
        return _open_stats_fd(self, self.kvm, "VM")

    # -- MSR filters and user-space MSR exits ----------------------------------

    def x86_set_msr_filter(self, ranges=(), *, default_deny: bool = False) -> None:
        """``KVM_X86_SET_MSR_FILTER`` (needs KVM_CAP_X86_MSR_FILTER): which
        guest ``rdmsr``/``wrmsr`` KVM allows.  See the KVM API documentation,
        "4.97 KVM_X86_SET_MSR_FILTER".

        ``ranges`` holds up to ``KVM_MSR_FILTER_MAX_RANGES`` (16) tuples
        ``(base, nmsrs, flags, allowed)``: the range covers MSRs ``base`` to
        ``base + nmsrs - 1`` (``nmsrs`` at most ``8 *
        KVM_MSR_FILTER_MAX_BITMAP_SIZE``) for the accesses in ``flags``
        (``KVM_MSR_FILTER_READ | KVM_MSR_FILTER_WRITE``); ``allowed`` is the
        bitmap, bytes whose bit ``i`` allows MSR ``base + i`` (at least
        ``(nmsrs + 7) // 8`` of them), or an iterable of the MSR indices
        allowed (the others in the range are denied).  An access no range
        covers gets the default: allowed, or denied with ``default_deny``.
        No ranges and no ``default_deny`` removes the filter.

        A denied access raises #GP in the guest, or exits to user space as
        :class:`pyvt.exits.Msr` once ``enable_cap("KVM_CAP_X86_USER_SPACE_MSR",
        KVM_MSR_EXIT_REASON_FILTER)`` asked for that ("7.21
        KVM_CAP_X86_USER_SPACE_MSR").  ``ranges`` may also be a cffi
        ``struct kvm_msr_filter`` (or pointer), passed as it is.
        """
        if isinstance(ranges, ffi.CData):
            if default_deny:
                raise ArgumentError("default_deny goes in the flags of the struct kvm_msr_filter "
                                    "passed, not as an argument")
            msr_filter, keep = _struct_pointer(ranges, "struct kvm_msr_filter",
                                               "KVM_X86_SET_MSR_FILTER"), ()
        else:
            msr_filter, keep = self._msr_filter_struct(ranges, default_deny)
        try:
            self._ioctl("KVM_X86_SET_MSR_FILTER", lib.KVM_X86_SET_MSR_FILTER, msr_filter)
        except KvmError as e:
            if self.check_extension("KVM_CAP_X86_MSR_FILTER"):
                raise
            raise KvmError("KVM_X86_SET_MSR_FILTER", e.errno,
                           "this KVM lacks KVM_CAP_X86_MSR_FILTER") from None
        del keep  # the bitmaps: KVM has copied them

    @staticmethod
    def _msr_filter_struct(ranges, default_deny: bool):
        """(struct kvm_msr_filter *, its bitmaps) from x86_set_msr_filter's
        plain ranges, validated."""
        ranges = _as_list(ranges, "MSR filter ranges", "(base, nmsrs, flags, allowed) tuples")
        limit = lib.KVM_MSR_FILTER_MAX_RANGES
        if len(ranges) > limit:
            raise ArgumentError(f"an MSR filter holds at most {limit} ranges, not {len(ranges)}")
        msr_filter = ffi.new("struct kvm_msr_filter *", {
            "flags": lib.KVM_MSR_FILTER_DEFAULT_DENY if default_deny
            else lib.KVM_MSR_FILTER_DEFAULT_ALLOW})
        bitmaps = []
        valid_flags = lib.KVM_MSR_FILTER_READ | lib.KVM_MSR_FILTER_WRITE
        from .msr_filter import RANGE_MSRS as max_msrs
        for n, spec in enumerate(ranges):
            if not isinstance(spec, tuple) or len(spec) != 4:
                raise ArgumentTypeError(f"MSR filter range {n} must be a tuple (base, nmsrs, flags, "
                                        f"allowed), not {spec!r}")
            base, nmsrs, flags, allowed = spec
            base = _u32(base, "MSR filter range base")
            if isinstance(nmsrs, bool) or not isinstance(nmsrs, int) or not 1 <= nmsrs <= max_msrs:
                raise ArgumentError(f"MSR filter range {base:#x}: nmsrs must be 1-{max_msrs} "
                                    f"(KVM_MSR_FILTER_MAX_BITMAP_SIZE bytes of bitmap), not {nmsrs!r}")
            if base + nmsrs > 1 << 32:
                raise ArgumentError(f"MSR filter range {base:#x}+{nmsrs:#x} runs past MSR 0xffffffff")
            flags = _u32(flags, "MSR filter range flags")
            if not flags or flags & ~valid_flags:
                raise ArgumentError(f"MSR filter range {base:#x}: flags must be KVM_MSR_FILTER_READ, "
                                    f"KVM_MSR_FILTER_WRITE or both, not {flags:#x}")
            # KVM copies whole longs of bitmap: allocate that much, zeroed.
            bitmap = ffi.new("__u8[]", (nmsrs + 63) // 64 * 8)
            VmFd._fill_msr_bitmap(bitmap, base, nmsrs, allowed)
            bitmaps.append(bitmap)
            msr_filter.ranges[n] = {"flags": flags, "nmsrs": nmsrs, "base": base, "bitmap": bitmap}
        return msr_filter, bitmaps

    @staticmethod
    def _fill_msr_bitmap(bitmap, base: int, nmsrs: int, allowed) -> None:
        """Sets the bits of ``allowed`` (bytes, or MSR indices) in ``bitmap``."""
        need = (nmsrs + 7) // 8
        if isinstance(allowed, (bytes, bytearray, memoryview)):
            raw = bytes(allowed)
            if len(raw) < need:
                raise ArgumentError(f"MSR filter range {base:#x}: {nmsrs} MSRs need a bitmap of "
                                    f"{need} bytes, not {len(raw)}")
            ffi.buffer(bitmap, need)[:] = raw[:need]
            return
        for index in _as_list(allowed, f"MSR filter range {base:#x}'s allowed MSRs",
                              "MSR indices (or a bytes bitmap)"):
            if isinstance(index, bool) or not isinstance(index, int) \
                    or not base <= index < base + nmsrs:
                raise ArgumentError(f"MSR filter range {base:#x}+{nmsrs:#x}: allowed MSR {index!r} "
                                    "is outside the range")
            bit = index - base
            bitmap[bit // 8] |= 1 << (bit % 8)



def _memory_encryption_host() -> bool:
    """Whether this host's KVM was set up for encrypted guests (kvm_amd's sev
    or kvm_intel's tdx parameter on)."""
    for parameter in ("/sys/module/kvm_amd/parameters/sev",
                      "/sys/module/kvm_intel/parameters/tdx"):
        try:
            with open(parameter) as f:
                if f.read().strip() in ("Y", "1"):
                    return True
        except OSError:
            pass
    return False

