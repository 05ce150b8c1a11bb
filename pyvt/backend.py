"""Which KVM-ABI device a VM runs on: :func:`select_backend`."""

from __future__ import annotations

import os

from .errors import ArgumentError, BackendNotFound
from .kvm import DEFAULT_DEVICE, PYVT_DEVICE

__all__ = ["select_backend"]


def select_backend(backend=None) -> str:
    """The device to use: ``backend`` if given, else ``$PYVT_BACKEND``, else
    ``/dev/kvm``, else ``/dev/pyvt`` (the project's kernel module)."""
    if backend is not None:
        if not isinstance(backend, (str, os.PathLike)):
            raise ArgumentError(f"backend must be a device path, not {backend!r}")
        return os.fspath(backend)
    env = os.environ.get("PYVT_BACKEND")
    if env:
        return env
    for path in (DEFAULT_DEVICE, PYVT_DEVICE):
        if os.path.exists(path):
            return path
    raise BackendNotFound(
        2, f"neither {DEFAULT_DEVICE} nor {PYVT_DEVICE} exists: this host has no "
        "KVM (load kvm-intel or kvm-amd, or pyvt.ko from kernel_module/)")
