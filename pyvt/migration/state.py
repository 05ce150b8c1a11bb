"""The non-memory state of a migrating VM, in the encodings snapshots use.

``STATE`` is a pyvt snapshot file (:mod:`pyvt.snapshot_file`) whose
regions hold no pages: the same versioned, SHA-256-checked format, field
checks and CPUID check (:func:`pyvt.cpu_features.check_cpuid`) as
``Snapshot.load``.  ``HOOKS`` carries the ``vm.add_state`` hooks' states,
encoded as the snapshot file encodes device states."""

from __future__ import annotations

import json
import os
import struct
import tempfile
from typing import Any, Dict, List

from .. import snapshot, snapshot_file
from ..backend import select_backend
from ..cpu_features import check_cpuid
from ..errors import Error, MigrationError
from ..kvm import Kvm
from ..snapshot_memory import new_image
from ..vcpu import paused

_LENGTH = struct.Struct("<I")


def _scratch_dir() -> str:
    """RAM-backed where there is one: the file is written and read during
    the downtime."""
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


def take(vm) -> "snapshot.Snapshot":
    """The paused ``vm``'s state (regions empty: memory travels in PAGES)."""
    regions = [new_image(r.gpa, r.size, r.readonly) for r in vm.memory.regions]
    try:
        with paused(vm, "complete writes"):
            vm._sync_devices()
            return snapshot.take_state(vm, regions)
    except BaseException:
        for image in regions:
            image.close()
        raise


def encode(snap) -> bytes:
    with tempfile.TemporaryDirectory(prefix="pyvt-migrate-", dir=_scratch_dir()) as tmp:
        path = os.path.join(tmp, "state")
        snapshot_file.save(snap, path)
        with open(path, "rb") as f:
            return f.read()


def decode(payload: bytes, backend) -> "snapshot.Snapshot":
    """The state a STATE chunk holds, checked as ``Snapshot.load`` checks a
    file (CPUID against ``backend``'s KVM included)."""
    with tempfile.TemporaryDirectory(prefix="pyvt-incoming-", dir=_scratch_dir()) as tmp:
        path = os.path.join(tmp, "state")
        with open(path, "wb") as f:
            f.write(payload)
        try:
            snap = snapshot_file.load(path)
        except Error as e:
            raise MigrationError(f"the VM's state is refused: {str(e).replace(path, 'it')}") \
                from None
    try:
        check_cpuid(snap, Kvm.shared(select_backend(backend)))
    except Error as e:
        snap.close()
        raise MigrationError(f"the VM cannot run here: {e}") from None
    return snap


def encode_hooks(states: Dict[str, Any]) -> bytes:
    blobs: List[bytes] = []

    def blob(data: bytes) -> int:
        blobs.append(data)
        return len(blobs) - 1

    encoded = {name: snapshot_file._encode_state(state, blob) for name, state in states.items()}
    head = json.dumps({"states": encoded, "blobs": [len(b) for b in blobs]}).encode()
    return _LENGTH.pack(len(head)) + head + b"".join(blobs)


def decode_hooks(payload: bytes) -> Dict[str, Any]:
    def bad(what: str):
        raise MigrationError(f"the HOOKS chunk is malformed: {what}")

    if len(payload) < _LENGTH.size:
        bad("too short")
    (length,) = _LENGTH.unpack_from(payload)
    try:
        head = json.loads(payload[_LENGTH.size:_LENGTH.size + length])
    except (ValueError, RecursionError) as e:
        bad(f"not JSON ({e})")
    if not (isinstance(head, dict) and set(head) == {"states", "blobs"}
            and isinstance(head["states"], dict) and isinstance(head["blobs"], list)
            and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                    for n in head["blobs"])):
        bad("its fields are wrong")
    offsets, at = [], _LENGTH.size + length
    for n in head["blobs"]:
        offsets.append(at)
        at += n
    if at != len(payload):
        bad("its blobs do not add up")
    check = snapshot_file._Header("the HOOKS chunk", head["blobs"])
    try:
        for name, state in head["states"].items():
            snapshot_file._check_state_blobs(check, state, name)
    except Error as e:
        raise MigrationError(str(e)) from None

    def get(index: int) -> bytes:
        return payload[offsets[index]:offsets[index] + head["blobs"][index]]

    return {name: snapshot_file._decode_state(state, get)
            for name, state in head["states"].items()}
