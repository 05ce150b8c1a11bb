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
``acpi_pm1``   0x600-0x605     ACPI PM1a event (status, enable) and control
                               blocks; sleeping in S5 powers off: ``run()``
                               returns :class:`pyvt.exits.PowerOff`; in S3
                               :class:`pyvt.exits.Suspend` (wake it with
                               :func:`pyvt.acpi_sleep.resume`)
``i8042``      0x60, 0x64      keyboard controller; 0xfe to 0x64 resets:
                               ``run()`` returns :class:`pyvt.exits.Reset`
``post``       0x80            POST-code sink (the last code reads back)
=============  ==============  ===============================================

Any of them can be taken off the bus with ``detach()`` so that a Python
handler (``vm.on_io``) can serve its ports instead.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Union

from . import _native, exits
from .devices import (
    Device,
    DeviceDescriptor,
    RegisterDevice,
    state_bytes,
    state_fields,
    state_int,
    state_items,
)
from .errors import ArgumentError, DeviceStateError

# The C headers' numbers (csrc/*.h, through pyvt/includes/core.pxd).
FW_CFG_PORT = _native.FW_CFG_PORT
CMOS_PORT = _native.CMOS_PORT
PM_TIMER_PORT = _native.PM_TIMER_PORT
PM_TIMER_HZ = _native.PM_TIMER_HZ
I8042_DATA_PORT = _native.I8042_DATA_PORT
I8042_COMMAND_PORT = _native.I8042_COMMAND_PORT
I8042_RESET_VALUE = _native.I8042_CMD_PULSE_RESET
POST_PORT = _native.POST_PORT
PM1_PORT = _native.PM1_PORT
PM1_EVENT_PORT = PM1_PORT
PM1_EVENT_LENGTH = _native.PM1_EVENT_LENGTH
PM1_CONTROL_PORT = PM1_PORT + PM1_EVENT_LENGTH
PM1_CONTROL_LENGTH = _native.PM1_CONTROL_LENGTH
#: The SLP_TYP values of the DSDT's \_S5 (power off) and \_S3 (suspend to RAM).
SLP_TYP_S5 = _native.PM1_SLP_TYP_S5
SLP_TYP_S3 = _native.PM1_SLP_TYP_S3
#: PM1_STS: woken, and woken by the RTC alarm; PM1_EN: the RTC alarm may wake.
PM1_STS_WAK = _native.PM1_STS_WAK
PM1_STS_RTC = _native.PM1_STS_RTC
PM1_EN_RTC = _native.PM1_EN_RTC

#: The fw_cfg keys pyvt fills in (QEMU's numbers, hw/nvram/fw_cfg.h).
FW_CFG_SIGNATURE = _native.FW_CFG_SIGNATURE
FW_CFG_ID = _native.FW_CFG_ID
FW_CFG_RAM_SIZE = _native.FW_CFG_RAM_SIZE
FW_CFG_NB_CPUS = _native.FW_CFG_NB_CPUS
FW_CFG_MAX_CPUS = _native.FW_CFG_MAX_CPUS
FW_CFG_FILE_DIR = _native.FW_CFG_FILE_DIR
FW_CFG_FILE_FIRST = _native.FW_CFG_FILE_FIRST
_DEVICE_KEYS = (FW_CFG_SIGNATURE, FW_CFG_ID, FW_CFG_FILE_DIR)
#: The keys a saved fw_cfg state may set: numbered items, then files.
_ITEM_KEYS = range(FW_CFG_ID + 1, FW_CFG_FILE_FIRST)
_FILE_KEYS = range(FW_CFG_FILE_FIRST, _native.FW_CFG_KEY_COUNT)


def _as_bytes(data, what: str) -> bytes:
    if isinstance(data, str):
        return data.encode()
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ArgumentError(f"{what} must be bytes or str, not {type(data).__name__}")
    data = bytes(data)
    if len(data) >= 1 << 32:
        raise ArgumentError(f"{what} is {len(data)} bytes; fw_cfg items hold less than 4 GiB")
    return data


class FwCfg(Device):
    """QEMU's fw_cfg at 0x510 (selector, 16-bit write) and 0x511 (data).

    The signature ("QEMU"), the interface ID, RAM size (key 0x03) and CPU
    count (keys 0x05 and 0x0f) are filled in; ``add_file("opt/x", data)``
    publishes a named file in the directory (key 0x19) the way QEMU's
    ``-fw_cfg name=opt/x,file=...`` does, and ``set(key, data)`` sets a
    numbered item below 0x20.
    """

    has_state = True

    def _start(self) -> None:
        self._native.set_u64(FW_CFG_RAM_SIZE, self._vm.memory.size)
        self.cpu_count = 1

    def set(self, key: int, data: Union[bytes, str]) -> None:
        """Sets numbered item ``key`` (0x02-0x1f, not 0x19) to ``data``."""
        if isinstance(key, bool) or not isinstance(key, int):
            raise ArgumentError(f"fw_cfg key must be an int, not {key!r}")
        if not 0 <= key < FW_CFG_FILE_FIRST or key in _DEVICE_KEYS:
            raise ArgumentError(
                f"fw_cfg key {key:#x} cannot be set: numbered items are 0x02-0x1f except "
                f"0x19 (the file directory); use add_file(name, data) for anything else")
        self._native.set(key, _as_bytes(data, "fw_cfg data"))

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
        return self._native.add_file(raw, _as_bytes(data, "fw_cfg file data"))

    def get(self, key: int) -> Optional[bytes]:
        """Item ``key`` as the guest reads it, or None if there is none."""
        if (isinstance(key, bool) or not isinstance(key, int)
                or not 0 <= key < _native.FW_CFG_KEY_COUNT):
            raise ArgumentError(f"fw_cfg key must be an int in 0-"
                                f"{_native.FW_CFG_KEY_COUNT - 1:#x}, not {key!r}")
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

    # -- state: items, files (each keeps its key) and the read position -------

    def save_state(self) -> Dict[str, Any]:
        """``{"items": [[key, data]...], "files": [[key, name, data]...],
        "position": [selector, offset]}``: what the guest can read."""
        native = self._native
        items = [[key, native.get(key)] for key in _ITEM_KEYS
                 if key != FW_CFG_FILE_DIR and native.get(key)]
        files = [[key, name, native.get(key)]
                 for name, key in sorted(self.files().items(), key=lambda item: item[1])]
        return {"items": items, "files": files, "position": list(native.position())}

    def _put_state(self, state: Dict[str, Any]) -> None:
        """Restores a saved state into a fw_cfg that holds no files the saved
        one lacks (so that every file keeps its key)."""
        for key, data in state["items"]:
            self._native.set(key, data)
        for key, name, data in state["files"]:
            got = self.add_file(name, data)
            if got != key:
                raise ArgumentError(
                    f"fw_cfg file {name!r} got key {got:#x} here but had {key:#x}: load the "
                    "state into a VM whose fw_cfg has no files of its own")
        self._native.set_position(*state["position"])

    @classmethod
    def check_state(cls, state: Any, native: Any) -> Dict[str, Any]:
        state_fields(state, "", ("items", "files", "position"))
        items = []
        for i, item in enumerate(state_items(state["items"], "items")):
            key, data = state_items(item, f"items[{i}]", 2)
            state_int(key, f"items[{i}] key", _ITEM_KEYS.start, _ITEM_KEYS.stop - 1)
            if key == FW_CFG_FILE_DIR:
                raise DeviceStateError(
                    f"items[{i}] is the file directory, which fw_cfg makes itself")
            items.append([key, state_bytes(data, f"items[{i}] data")])
        files = []
        for i, item in enumerate(state_items(state["files"], "files")):
            key, name, data = state_items(item, f"files[{i}]", 3)
            state_int(key, f"files[{i}] key", _FILE_KEYS.start, _FILE_KEYS.stop - 1)
            raw = name.encode("utf-8", "surrogatepass") if isinstance(name, str) else b""
            if not raw or len(raw) >= _native.FW_CFG_NAME_SIZE or b"\0" in raw:
                raise DeviceStateError(f"files[{i}] name {name!r} is not a fw_cfg file name")
            files.append([key, name, state_bytes(data, f"files[{i}] data")])
        selector, offset = state_items(state["position"], "position", 2)
        position = [state_int(selector, "position selector", 0, 0xFFFF),
                    state_int(offset, "position offset", 0, (1 << 32) - 1)]
        return {"items": items, "files": files, "position": position}


class Cmos(RegisterDevice):
    """CMOS RAM and the MC146818 RTC at 0x70 (index) / 0x71 (data)."""

    def _start(self) -> None:
        size = self._vm.memory.size
        below = min(size, 1 << 32)
        self._native.set_memory(below, size - below)

    def _check_index(self, index: int) -> None:
        if (isinstance(index, bool) or not isinstance(index, int)
                or not 0 <= index < _native.CMOS_SIZE):
            raise ArgumentError(f"CMOS index must be an int in 0-{_native.CMOS_SIZE - 1:#x}, "
                                f"not {index!r}")

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


class PmTimer(Device):
    """The ACPI PM timer: 32-bit port ``port``, counting at 3.579545 MHz
    (host time: no state to save)."""

    hz = PM_TIMER_HZ

    @property
    def value(self) -> int:
        """The counter now."""
        return self._native.value()


class I8042(RegisterDevice):
    """The keyboard controller at 0x64 (status/command) and 0x60 (data),
    without a keyboard.  Writing 0xfe to 0x64 (or clearing the reset bit of
    the output port) stops ``run()`` with :class:`pyvt.exits.Reset`.
    ``port`` is the command port, ``data_port`` the data port; ``detach()``
    takes both off the bus."""

    @property
    def port(self) -> int:
        return self._native.base + I8042_COMMAND_PORT - I8042_DATA_PORT

    @property
    def data_port(self) -> int:
        return self._native.base

    def stop_exit(self, code: int, port: int, vcpu) -> exits.AnyExit:
        if code == _native.I8042_STOP_RESET:
            return exits.Reset(self.name, port, vcpu._rip())
        return super().stop_exit(code, port, vcpu)


class PostCode(RegisterDevice):
    """Port 0x80: ``last`` is the last POST code the guest wrote."""

    @property
    def last(self) -> int:
        return self._native.last

    @property
    def writes(self) -> int:
        return self._native.writes


class AcpiPm1(RegisterDevice):
    """The ACPI PM1a blocks at 0x600: PM1_STS (write 1 to clear), PM1_EN,
    PM1_CNT (SCI_EN reads 1).  Writing SLP_TYP 0 (``\\_S5``) with SLP_EN to
    PM1_CNT stops ``run()`` with :class:`pyvt.exits.PowerOff`; SLP_TYP 1
    (``\\_S3``) with :class:`pyvt.exits.Suspend`."""

    @property
    def status(self) -> int:
        return self._native.status

    def set_status(self, bits: int) -> None:
        """Sets PM1_STS ``bits`` as the hardware does on an event (WAK_STS,
        RTC_STS...): the guest clears them by writing ones."""
        state = bytearray(self._native.save_state())
        state[0:2] = (int.from_bytes(state[0:2], "little") | bits).to_bytes(2, "little")
        self._native.load_state(bytes(state))

    @property
    def enable(self) -> int:
        return self._native.enable

    @property
    def control(self) -> int:
        return self._native.control

    def stop_exit(self, code: int, port: int, vcpu) -> exits.AnyExit:
        if code == _native.PM1_STOP_POWEROFF:
            return exits.PowerOff(self.name, port, vcpu._rip())
        if code == _native.PM1_STOP_SUSPEND:
            return exits.Suspend(self.name, port, vcpu._rip())
        return super().stop_exit(code, port, vcpu)


#: The PC devices, which ``Vm(pc_devices=False)`` leaves out.
PC_DEVICES = (
    DeviceDescriptor("fw_cfg", _native.FwCfg, FwCfg, FW_CFG_PORT, pc=True),
    DeviceDescriptor("cmos", _native.Cmos, Cmos, CMOS_PORT, pc=True),
    DeviceDescriptor("pm_timer", _native.PmTimer, PmTimer, PM_TIMER_PORT, pc=True),
    DeviceDescriptor("acpi_pm1", _native.AcpiPm1, AcpiPm1, PM1_PORT, pc=True),
    DeviceDescriptor("i8042", _native.I8042, I8042, I8042_DATA_PORT, pc=True),
    DeviceDescriptor("post", _native.PostCode, PostCode, POST_PORT, pc=True),
)
_STATEFUL = tuple(d for d in PC_DEVICES if d.handle.has_state)


# -- state, for snapshots and clones -----------------------------------------

def save_state(vm) -> Dict[str, Any]:
    """The PC devices' guest-visible state, ``{name: state}``: fw_cfg items,
    files and read position, CMOS RAM and clock offset, the i8042's
    registers, the last POST code.  (The PM timer counts host time and has
    none.)  A device a VM lacks is None.  :func:`load_state` puts it into
    another VM."""
    return {d.name: None if vm.devices.get(d.name) is None else vm.devices[d.name].save_state()
            for d in _STATEFUL}


def load_state(vm, state: Dict[str, Any]) -> None:
    """Restores what :func:`save_state` returned into ``vm`` (whose fw_cfg
    must hold no files the saved one lacks, so that every file keeps its key)."""
    if not isinstance(state, dict) or set(state) != {d.name for d in _STATEFUL}:
        raise ArgumentError("load_state takes what pyvt.pc.save_state returned")
    for d in _STATEFUL:
        device, saved = vm.devices.get(d.name), state[d.name]
        if saved is None:
            continue
        if device is None:
            raise ArgumentError(f"the saved state has a {d.name} but this VM has none "
                                "(made with pc_devices=False?)")
        device.load_state(saved)
