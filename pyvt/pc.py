"""The standard PC devices a kernel expects, native and always on the bus.

Each is one C file in ``csrc/`` and runs with no Python on its path; the
classes here configure them and read their state.

=============  ==============  ===============================================
attribute      ports           device
=============  ==============  ===============================================
``fw_cfg``     0x510-0x511     QEMU fw_cfg: signature, CPU count, RAM size,
                               your own keys and named files
``cmos``       0x70-0x71       CMOS RAM and RTC (host UTC time, memory sizes)
``pm_timer``   0x608-0x60b     ACPI PM timer, 3.579545 MHz, 32 bits
``i8042``      0x60, 0x64      keyboard controller; 0xfe to 0x64 resets:
                               ``run()`` returns :class:`pyvt.exits.Reset`
``post``       0x80            POST-code sink (the last code reads back)
=============  ==============  ===============================================

Any of them can be taken off the bus with ``detach()`` so that a Python
handler (``vm.on_io``) can serve its ports instead.
"""

from __future__ import annotations

from typing import Optional, Union

from . import _native
from .errors import ArgumentError, KvmError

FW_CFG_PORT = 0x510
CMOS_PORT = 0x70
PM_TIMER_PORT = 0x608
PM_TIMER_HZ = _native.PM_TIMER_HZ
I8042_DATA_PORT = 0x60
I8042_COMMAND_PORT = 0x64
I8042_RESET_VALUE = 0xFE
POST_PORT = 0x80

#: The fw_cfg keys pyvt fills in (QEMU's numbers, hw/nvram/fw_cfg.h).
FW_CFG_SIGNATURE = 0x00
FW_CFG_ID = 0x01
FW_CFG_RAM_SIZE = _native.FW_CFG_RAM_SIZE
FW_CFG_NB_CPUS = _native.FW_CFG_NB_CPUS
FW_CFG_MAX_CPUS = _native.FW_CFG_MAX_CPUS
FW_CFG_FILE_DIR = 0x19
FW_CFG_FILE_FIRST = _native.FW_CFG_FILE_FIRST
_DEVICE_KEYS = (FW_CFG_SIGNATURE, FW_CFG_ID, FW_CFG_FILE_DIR)


class _PlatformDevice:
    """A native PC device on one port range of ``vm``."""

    name = "device"

    def __init__(self, vm, native, port: int, length: int):
        self._vm = vm
        self._native = native
        self.port = port
        self.length = length

    @property
    def attached(self) -> bool:
        return bool(self._native.attached)

    def __repr__(self) -> str:
        state = "attached" if self.attached else "detached"
        return f"<{type(self).__name__} at {self.port:#x}, {state}>"

    def detach(self) -> None:
        """Takes the device off its ports so a Python handler can have them."""
        self._vm._check_open()
        if not self._native.attached:
            return
        rc = self._native.detach()
        if rc:
            raise KvmError(f"detach {self.name}", -rc)
        self._vm._claims.pop((_native.SPACE_PIO, self.port), None)


def _as_bytes(data, what: str) -> bytes:
    if isinstance(data, str):
        return data.encode()
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ArgumentError(f"{what} must be bytes or str, not {type(data).__name__}")
    data = bytes(data)
    if len(data) >= 1 << 32:
        raise ArgumentError(f"{what} is {len(data)} bytes; fw_cfg items hold less than 4 GiB")
    return data


class FwCfg(_PlatformDevice):
    """QEMU's fw_cfg at 0x510 (selector, 16-bit write) and 0x511 (data).

    The signature ("QEMU"), the interface ID, RAM size (key 0x03) and CPU
    count (keys 0x05 and 0x0f) are filled in; ``add_file("opt/x", data)``
    publishes a named file in the directory (key 0x19) the way QEMU's
    ``-fw_cfg name=opt/x,file=...`` does, and ``set(key, data)`` sets a
    numbered item below 0x20.
    """

    name = "fw_cfg"

    def set(self, key: int, data: Union[bytes, str]) -> None:
        """Sets numbered item ``key`` (0x02-0x1f, not 0x19) to ``data``."""
        if isinstance(key, bool) or not isinstance(key, int):
            raise ArgumentError(f"fw_cfg key must be an int, not {key!r}")
        if not 0 <= key < FW_CFG_FILE_FIRST or key in _DEVICE_KEYS:
            raise ArgumentError(
                f"fw_cfg key {key:#x} cannot be set: numbered items are 0x02-0x1f except "
                f"0x19 (the file directory); use add_file(name, data) for anything else")
        rc = self._native.set(key, _as_bytes(data, "fw_cfg data"))
        if rc:
            raise KvmError("fw_cfg set", -rc)

    def add_file(self, name: str, data: Union[bytes, str]) -> int:
        """Publishes ``data`` as the file ``name`` (e.g. ``"opt/org.example/cfg"``;
        QEMU reserves names outside ``opt/`` for itself, but any is accepted).
        Adding a name again replaces its contents.  Returns the file's key."""
        if not isinstance(name, str):
            raise ArgumentError(f"fw_cfg file name must be a str, not {type(name).__name__}")
        raw = name.encode()
        limit = _native.FW_CFG_NAME_SIZE - 1
        if not raw or len(raw) > limit or b"\0" in raw:
            raise ArgumentError(f"fw_cfg file name {name!r} must be 1-{limit} bytes without NUL")
        rc = self._native.add_file(raw, _as_bytes(data, "fw_cfg file data"))
        if rc < 0:
            raise KvmError("fw_cfg add_file", -rc,
                           "no fw_cfg key is left" if rc == -28 else "")
        return rc

    def get(self, key: int) -> Optional[bytes]:
        """Item ``key`` as the guest reads it, or None if there is none."""
        if isinstance(key, bool) or not isinstance(key, int) or not 0 <= key < 0x4000:
            raise ArgumentError(f"fw_cfg key must be an int in 0-0x3fff, not {key!r}")
        return self._native.get(key)

    def files(self) -> dict:
        """``{name: key}`` from the file directory, as the guest sees it."""
        raw = self._native.get(FW_CFG_FILE_DIR)
        count = int.from_bytes(raw[:4], "big")
        out = {}
        for i in range(count):
            entry = raw[4 + i * 64: 4 + (i + 1) * 64]
            out[entry[8:].split(b"\0", 1)[0].decode()] = int.from_bytes(entry[4:6], "big")
        return out

    @property
    def cpu_count(self) -> int:
        return int.from_bytes(self._native.get(FW_CFG_NB_CPUS) or b"\1\0", "little")

    @cpu_count.setter
    def cpu_count(self, count: int) -> None:
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= 0xFFFF:
            raise ArgumentError(f"CPU count must be an int in 1-65535, not {count!r}")
        for key in (FW_CFG_NB_CPUS, FW_CFG_MAX_CPUS):
            self._native.set_u16(key, count)

    def _set_ram_size(self, size: int) -> None:
        self._native.set_u64(FW_CFG_RAM_SIZE, size)


class Cmos(_PlatformDevice):
    """CMOS RAM and the MC146818 RTC at 0x70 (index) / 0x71 (data)."""

    name = "cmos"

    def _check_index(self, index: int) -> None:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < 0x80:
            raise ArgumentError(f"CMOS index must be an int in 0-0x7f, not {index!r}")

    def __getitem__(self, index: int) -> int:
        """The byte the guest reads at ``index`` (clock registers included)."""
        self._check_index(index)
        return self._native.read(index)

    def __setitem__(self, index: int, value: int) -> None:
        """Writes a byte as the guest would (writing the clock sets it)."""
        self._check_index(index)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 0x100:
            raise ArgumentError(f"CMOS value must be a byte, not {value!r}")
        self._native.write(index, value)

    def _set_memory(self, size: int) -> None:
        below = min(size, 1 << 32)
        self._native.set_memory(below, size - below)


class PmTimer(_PlatformDevice):
    """The ACPI PM timer: 32-bit port ``port``, counting at 3.579545 MHz."""

    name = "pm_timer"
    hz = PM_TIMER_HZ

    @property
    def value(self) -> int:
        """The counter now."""
        return self._native.value()


class I8042(_PlatformDevice):
    """The keyboard controller at 0x64 (status/command) and 0x60 (data),
    without a keyboard.  Writing 0xfe to 0x64 (or clearing the reset bit of
    the output port) stops ``run()`` with :class:`pyvt.exits.Reset`."""

    name = "i8042"

    def __init__(self, vm, native, port: int, data_port: int):
        super().__init__(vm, native, port, 1)
        self.data_port = data_port

    @property
    def attached(self) -> bool:
        return bool(self._native.attached or self._native.data_attached)

    def detach(self) -> None:
        """Takes both ports off the bus."""
        self._vm._check_open()
        super().detach()
        rc = self._native.detach_data_port(self.data_port)
        if rc:
            raise KvmError("detach i8042 data port", -rc)
        self._vm._claims.pop((_native.SPACE_PIO, self.data_port), None)


class PostCode(_PlatformDevice):
    """Port 0x80: ``last`` is the last POST code the guest wrote."""

    name = "post"

    @property
    def last(self) -> int:
        return self._native.last

    @property
    def writes(self) -> int:
        return self._native.writes


def add_pc_devices(vm) -> None:
    """Puts the PC devices on ``vm``'s port bus (called by :class:`pyvt.Vm`)."""
    machine, pio = vm._machine, _native.SPACE_PIO
    size = vm.memory.size

    native = _native.FwCfg(machine, FW_CFG_PORT)
    vm._attach(native, pio, FW_CFG_PORT, _native.FW_CFG_PORT_COUNT, "fw_cfg")
    vm.fw_cfg = FwCfg(vm, native, FW_CFG_PORT, _native.FW_CFG_PORT_COUNT)
    vm.fw_cfg._set_ram_size(size)
    vm.fw_cfg.cpu_count = 1

    native = _native.Cmos(machine, CMOS_PORT)
    vm._attach(native, pio, CMOS_PORT, _native.CMOS_PORT_COUNT, "cmos")
    vm.cmos = Cmos(vm, native, CMOS_PORT, _native.CMOS_PORT_COUNT)
    vm.cmos._set_memory(size)

    native = _native.PmTimer(machine, PM_TIMER_PORT)
    vm._attach(native, pio, PM_TIMER_PORT, _native.PM_TIMER_PORT_COUNT, "pm_timer")
    vm.pm_timer = PmTimer(vm, native, PM_TIMER_PORT, _native.PM_TIMER_PORT_COUNT)

    native = _native.I8042(machine, I8042_COMMAND_PORT)
    vm._attach(native, pio, I8042_COMMAND_PORT, 1, "i8042")
    vm._check_range_free(pio, I8042_DATA_PORT, 1)
    rc = native.attach_data_port(I8042_DATA_PORT)
    if rc:
        raise KvmError("attach i8042 data port", -rc)
    vm._claims[(pio, I8042_DATA_PORT)] = (1, "i8042")
    vm.i8042 = I8042(vm, native, I8042_COMMAND_PORT, I8042_DATA_PORT)

    native = _native.Port80(machine, POST_PORT)
    vm._attach(native, pio, POST_PORT, 1, "post")
    vm.post = PostCode(vm, native, POST_PORT, 1)


# -- state, for snapshots and clones -----------------------------------------

def save_state(vm) -> dict:
    """The PC devices' guest-visible state: fw_cfg items, files and read
    position, CMOS RAM and clock offset, the i8042's registers, the last POST
    code.  (The PM timer counts host time and has none.)  A device a VM lacks
    is None.  :func:`load_state` puts it into another VM."""
    fw = vm.fw_cfg
    fw_state = None
    if fw is not None:
        native = fw._native
        items = {key: native.get(key) for key in range(FW_CFG_ID + 1, FW_CFG_FILE_FIRST)
                 if key != FW_CFG_FILE_DIR and native.get(key)}
        files = sorted((key, name, native.get(key)) for name, key in fw.files().items())
        fw_state = {"items": items, "files": files, "position": native.position()}
    return {
        "fw_cfg": fw_state,
        "cmos": vm.cmos._native.save_state() if vm.cmos is not None else None,
        "i8042": vm.i8042._native.save_state() if vm.i8042 is not None else None,
        "post": vm.post._native.save_state() if vm.post is not None else None,
    }


def load_state(vm, state: dict) -> None:
    """Restores what :func:`save_state` returned into ``vm`` (whose fw_cfg
    must hold no files the saved one lacks, so that every file keeps its key)."""
    if not isinstance(state, dict) or set(state) != {"fw_cfg", "cmos", "i8042", "post"}:
        raise ArgumentError("load_state takes what pyvt.pc.save_state returned")
    for name in ("cmos", "i8042", "post"):
        device, saved = getattr(vm, name), state[name]
        if saved is None:
            continue
        if device is None:
            raise ArgumentError(f"the saved state has a {name} but this VM has none "
                                "(made with pc_devices=False?)")
        if device._native.load_state(saved):
            raise ArgumentError(f"the saved {name} state comes from another pyvt build")
    saved = state["fw_cfg"]
    if saved is None:
        return
    if vm.fw_cfg is None:
        raise ArgumentError("the saved state has a fw_cfg but this VM has none")
    for key, data in saved["items"].items():
        vm.fw_cfg._native.set(key, data)
    for key, name, data in saved["files"]:
        got = vm.fw_cfg.add_file(name, data)
        if got != key:
            raise ArgumentError(
                f"fw_cfg file {name!r} got key {got:#x} here but had {key:#x}: load the "
                "state into a VM whose fw_cfg has no files of its own")
    vm.fw_cfg._native.set_position(*saved["position"])
