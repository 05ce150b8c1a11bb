"""pyvt: hardware virtualization from Python.

Spawn minimal VMs in a few lines, write a VMM in Python, test what the host's
VT-x / AMD-V really does.  ``/dev/kvm`` is the default backend; the project's
own kernel module (``/dev/pyvt``) speaks the same ABI.

    import pyvt
    with pyvt.Vm(memory="64M") as vm:
        vm.memory.write(0x1000, code)
        cpu = vm.vcpu(0, mode="long")
        cpu.regs.rip = 0x1000
        print(cpu.run(timeout=1.0), vm.console.output)
"""

from . import exits, kvm, modes
from .errors import (
    ApiVersionMismatch,
    ArgumentError,
    ArgumentTypeError,
    BackendError,
    BackendNotFound,
    BackendPermissionError,
    ClosedError,
    DeviceError,
    DeviceStateError,
    EntryFailed,
    Error,
    GuestError,
    InternalError,
    InvalidModeError,
    KvmError,
    MemoryConfigError,
    MsrFault,
    OutOfRangeError,
    RegionOverlapError,
    SandboxError,
    GuestFault,
    SandboxTimeout,
    TripleFault,
    UnmappedAddressError,
    VcpuIndexError,
)
from .memory import GuestMemory, parse_size
from .registers import Registers
from .assemble import AssemblerError, assemble, assemble_file
from .runner import LOAD_ADDRESS, Result, run
from .snapshot import Snapshot, SnapshotError, SnapshotFileError, SnapshotFileNotFound
from .vcpu import Vcpu
from .vm import Vm, select_backend
from .sandbox import Sandbox, get_include
from . import pci

try:
    from ._version import version as __version__
except ImportError:  # running from a source tree that was never built
    __version__ = "0.0.0+unknown"

__all__ = [
    "Vm", "Vcpu", "run", "Result", "LOAD_ADDRESS", "assemble", "assemble_file", "AssemblerError", "Registers", "GuestMemory",
    "parse_size", "select_backend", "exits", "kvm", "modes", "__version__",
    "Error", "BackendError", "BackendNotFound", "BackendPermissionError",
    "ApiVersionMismatch", "KvmError", "MemoryConfigError", "RegionOverlapError",
    "OutOfRangeError", "InvalidModeError", "VcpuIndexError", "ClosedError",
    "ArgumentError", "ArgumentTypeError", "MsrFault", "GuestError", "TripleFault", "EntryFailed",
    "InternalError", "UnmappedAddressError", "DeviceError", "DeviceStateError",
    "Snapshot", "SnapshotError", "SnapshotFileError", "SnapshotFileNotFound",
    "Sandbox", "get_include", "SandboxError", "GuestFault", "SandboxTimeout",
    "pci",
]

# virtio (issue 15).
from .errors import DiskImageError, TapError, VirtioError, VirtqueueError  # noqa: E402

__all__ += ["DiskImageError", "TapError", "VirtioError", "VirtqueueError"]

# Run control (issue 17).
from .errors import ControlError, RunControlError  # noqa: E402

__all__ += ["RunControlError", "ControlError"]

# Live migration (issue 17).
from .errors import MigrationError  # noqa: E402
from .migration import Migration, MigrationResult  # noqa: E402

__all__ += ["MigrationError", "Migration", "MigrationResult"]
