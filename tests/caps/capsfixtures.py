"""Helpers for the pyvt caps tests: recorded register fixtures, KVM gating."""

from __future__ import annotations

import json
import os
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


def load_json(path: pathlib.Path) -> dict:
    with open(path) as f:
        return json.load(f)


def cpuid_fixture(name: str) -> tuple[dict, dict]:
    """(fixture document, CPUID dump {(leaf, subleaf): (eax, ebx, ecx, edx)})."""
    doc = load_json(FIXTURES / "cpuid" / f"{name}.json")
    dump = {}
    for leaf in doc["leaves"]:
        key = (int(leaf["leaf"], 16), int(leaf["subleaf"]))
        dump[key] = tuple(int(leaf[r], 16) for r in ("eax", "ebx", "ecx", "edx"))
    return doc, dump


def vmx_fixture(name: str) -> tuple[dict, dict[int, int]]:
    """(fixture document, {MSR index: value})."""
    from pyvt.caps.feature_control import IA32_FEATURE_CONTROL
    from pyvt.caps.vmx import MSR_INDICES

    doc = load_json(FIXTURES / "vmx" / f"{name}.json")
    indices = {**MSR_INDICES, "IA32_FEATURE_CONTROL": IA32_FEATURE_CONTROL}
    msrs = {indices[k]: int(v, 16) for k, v in doc["msrs"].items()}
    return doc, msrs


CPUID_FIXTURES = sorted(p.stem for p in (FIXTURES / "cpuid").glob("*.json"))
#: VMX fixtures recorded by VirtualBox on bare metal (they carry "vbox_decoded").
VMX_FIXTURES = sorted(p.stem for p in (FIXTURES / "vmx").glob("*.json") if "vbox_decoded" in load_json(p))


def backend_under_test() -> str:
    """The device the suite tests: ``$PYVT_BACKEND`` (the kernel-module harness sets /dev/pyvt), else /dev/kvm."""
    return os.environ.get("PYVT_BACKEND") or "/dev/kvm"


#: The PVM facts hold only for this machine's own /dev/kvm.
PVM_HOST = os.path.isdir("/sys/module/kvm_pvm") and backend_under_test() == "/dev/kvm"


def kvm_usable(path: str = "/dev/kvm") -> tuple[bool, str]:
    """Whether *path* opens and answers KVM_GET_API_VERSION (gate on this, never on cpuinfo)."""
    from pyvt.caps.collect import query_kvm

    k, _, _ = query_kvm(path)
    if k.status != "ok":
        return False, f"{path}: {k.status} ({k.error})"
    return True, ""


def is_root() -> bool:
    return os.geteuid() == 0
