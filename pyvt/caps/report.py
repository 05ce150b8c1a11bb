"""Assemble the ``pyvt caps`` report from raw data.

:class:`RawCaps` holds what :mod:`pyvt.caps.collect` read from the machine
(plain integers, strings and dicts, no file handles), so everything here is
pure and testable with recorded data. :func:`build_report` turns it into the
JSON-ready dict documented in ``SCHEMA.md``; :func:`render_text` prints it for
people, verdict first.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Iterable, Mapping
from typing import Any

from .._kvm import lib as uapi
from . import cpuid as cpuid_mod
from . import svm as svm_mod
from . import vmx as vmx_mod
from .feature_control import IA32_FEATURE_CONTROL, decode_feature_control

SCHEMA_VERSION = 1

#: Source labels, as they appear in the report's ``sources`` list.
SOURCE_HOST_CPUID = "host_cpuid"
SOURCE_MSR_DEVICE = "msr_device"
SOURCE_KVM_FEATURE_MSRS = "kvm_feature_msrs"
SOURCE_PYVT_HW_CAPS = "pyvt_hw_caps"
SOURCE_KVM = "kvm"
SOURCE_KVM_MODULE_PARAMETERS = "kvm_module_parameters"
SOURCE_PROBE = "probe"

#: Preference order when several sources carry the VMX/SVM MSRs: the
#: project's own driver reads the hardware directly, /dev/cpu/N/msr too,
#: KVM's feature MSRs are what KVM offers a nested guest (may be filtered).
MSR_SOURCE_ORDER = (SOURCE_PYVT_HW_CAPS, SOURCE_MSR_DEVICE, SOURCE_KVM_FEATURE_MSRS)

#: Features only a running guest can show; ``--require`` of one runs the probe.
PROBE_ONLY_FEATURES = ("real_mode", "protected_mode", "pio_exit", "mmio_exit", "single_step",
                       "ring3")
#: Probe results that replace the static guess of the same feature when the probe ran.
PROBE_FEATURES = PROBE_ONLY_FEATURES + ("long_mode", "irqchip", "smp")


@dataclasses.dataclass
class KvmRaw:
    """What the KVM system fd told us (all optional: a missing device has none)."""

    device: str
    status: str  # "ok" | "missing" | "permission_denied" | "error"
    error: str | None = None
    errno: int | None = None
    api_version: int | None = None
    capabilities: dict[str, int] = dataclasses.field(default_factory=dict)
    supported_cpuid: dict | None = None  # {(function, index): (eax, ebx, ecx, edx)}
    emulated_cpuid: dict | None = None
    msr_index_list: list[int] | None = None
    msr_feature_index_list: list[int] | None = None
    vcpu_mmap_size: int | None = None
    interface: str | None = None  # which code talked to the device
    errors: dict[str, str] = dataclasses.field(default_factory=dict)  # per-query failures


@dataclasses.dataclass
class RawCaps:
    """Everything collected from one machine, before decoding."""

    kvm: KvmRaw
    host_cpuid: dict | None = None
    host_cpuid_source: str | None = None
    host_cpuid_error: str | None = None
    msr_device: dict[int, int] | None = None
    msr_device_error: str | None = None
    kvm_feature_msrs: dict[int, int] | None = None
    kvm_feature_msrs_error: str | None = None
    pyvt_hw_caps: dict | None = None
    pyvt_hw_caps_error: str | None = None
    modules: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)
    kernel: str | None = None
    tool_version: str | None = None
    probe: list[dict] | None = None


# --- helpers ----------------------------------------------------------------

# pyvt.ko's uapi constants (kernel_module/include/uapi/pyvt.h) come from one
# place, the cffi module, which takes their values from the header at build
# time (``uapi.PYVT_*``; tests/caps/test_caps_uapi.py checks them).

#: ``pyvt_hw_caps.vendor`` as the report names it.
PYVT_VENDORS = {uapi.PYVT_VENDOR_UNKNOWN: "unknown", uapi.PYVT_VENDOR_AMD: "AMD", uapi.PYVT_VENDOR_INTEL: "Intel"}


def _field(obj: Any, name: str, default: Any = None) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(name, default)
    return getattr(obj, name, default)


def _cpu_caps_msrs(cpu: Any, vendor: int) -> dict[int, int]:
    """MSRs of one ``struct pyvt_cpu_caps``, only those its flags say were read."""
    flags = int(_field(cpu, "flags", 0))
    out: dict[int, int] = {}
    if flags & uapi.PYVT_CPU_CAPS_VMX_VALID:
        for i, value in enumerate(_field(cpu, "vmx_msrs", ()) or ()):
            out[uapi.PYVT_VMX_MSR_FIRST + i] = int(value)
    if vendor == uapi.PYVT_VENDOR_INTEL or flags & uapi.PYVT_CPU_CAPS_VMX_VALID:
        out[IA32_FEATURE_CONTROL] = int(_field(cpu, "feature_control", 0))
    if flags & uapi.PYVT_CPU_CAPS_VM_CR_VALID:
        out[svm_mod.MSR_VM_CR] = int(_field(cpu, "vm_cr", 0))
    return out


def _hw_caps_msrs(hw: Any | None) -> dict[int, int] | None:
    """MSRs from a PYVT_GET_HW_CAPS result.

    Accepts the ioctl's own shape (``struct pyvt_hw_caps`` with its ``cpus``
    array of ``struct pyvt_cpu_caps``, as a mapping or an object; CPU 0's
    registers are used) or a plain ``{"msrs": {index or name: value}}``.
    """
    if not hw:
        return None
    cpus = _field(hw, "cpus")
    if cpus:
        return _cpu_caps_msrs(cpus[0], int(_field(hw, "vendor", 0))) or None
    msrs = _field(hw, "msrs", {}) or {}
    out: dict[int, int] = {}
    names = {**vmx_mod.MSR_INDICES, "IA32_FEATURE_CONTROL": IA32_FEATURE_CONTROL, "VM_CR": svm_mod.MSR_VM_CR}
    for key, value in msrs.items():
        if isinstance(key, str) and not key.startswith("0x") and not key.isdigit():
            index = names.get(key)
            if index is None:
                continue
        else:
            index = int(key, 0) if isinstance(key, str) else int(key)
        out[index] = int(value, 0) if isinstance(value, str) else int(value)
    return out


def _hw_caps_summary(hw: Any | None) -> dict | None:
    """Header of PYVT_GET_HW_CAPS and whether every CPU reported the same registers.

    Firmware that enables VMX on some cores only is a real failure mode:
    ``differing_cpus`` names the CPUs whose registers differ from CPU 0's.
    """
    cpus = _field(hw, "cpus") if hw else None
    if not cpus:
        return None
    vendor = int(_field(hw, "vendor", 0))
    first = _cpu_caps_msrs(cpus[0], vendor)
    differing = [int(_field(c, "cpu", i)) for i, c in enumerate(cpus) if _cpu_caps_msrs(c, vendor) != first]
    return {
        "abi_version": _field(hw, "abi_version"),
        "vendor": PYVT_VENDORS.get(vendor, str(vendor)),
        "nr_cpus": _field(hw, "nr_cpus", len(cpus)),
        "cpus_reported": len(cpus),
        "npt_levels": _field(hw, "npt_levels"),
        "cpus_consistent": not differing,
        "differing_cpus": differing,
    }


def _msr_sources(raw: RawCaps) -> list[tuple[str, dict[int, int]]]:
    candidates = {
        SOURCE_PYVT_HW_CAPS: _hw_caps_msrs(raw.pyvt_hw_caps),
        SOURCE_MSR_DEVICE: raw.msr_device,
        SOURCE_KVM_FEATURE_MSRS: raw.kvm_feature_msrs,
    }
    out: list[tuple[str, dict[int, int]]] = []
    for name in MSR_SOURCE_ORDER:
        msrs = candidates[name]
        if msrs:
            out.append((name, msrs))
    return out


def _source_entry(name: str, data: Any, error: str | None, detail: str) -> dict:
    if data:
        status = "ok"
    elif error:
        status = "unavailable"
    else:
        status = "absent"
    return {"name": name, "status": status, "detail": error or detail}


def _decode_kvm(k: KvmRaw, modules: Mapping[str, Mapping[str, str]],
                feature_msrs: Mapping[int, int] | None) -> dict:
    caps = dict(sorted(k.capabilities.items()))
    out: dict[str, Any] = {
        "device": k.device,
        "status": k.status,
        "error": k.error,
        "errno": k.errno,
        "interface": k.interface,
        "api_version": k.api_version,
        "capabilities": caps,
        "max_vcpus": caps.get("KVM_CAP_MAX_VCPUS") or caps.get("KVM_CAP_NR_VCPUS") or None,
        "recommended_vcpus": caps.get("KVM_CAP_NR_VCPUS") or None,
        "max_vcpu_id": caps.get("KVM_CAP_MAX_VCPU_ID") or None,
        "max_memslots": caps.get("KVM_CAP_NR_MEMSLOTS") or None,
        "vcpu_mmap_size": k.vcpu_mmap_size,
        "supported_cpuid": _decode_kvm_cpuid(k.supported_cpuid),
        "emulated_cpuid": _decode_kvm_cpuid(k.emulated_cpuid),
        "msr_index_list": [f"0x{i:08x}" for i in k.msr_index_list] if k.msr_index_list is not None else None,
        "msr_feature_index_list": (
            [f"0x{i:08x}" for i in k.msr_feature_index_list] if k.msr_feature_index_list is not None else None),
        "feature_msrs": ({f"0x{i:08x}": f"0x{v:016x}" for i, v in sorted(feature_msrs.items())}
                         if feature_msrs is not None else None),
        "module_parameters": {m: dict(sorted(p.items())) for m, p in sorted(modules.items())},
        "query_errors": dict(k.errors),
    }
    return out


def _decode_kvm_cpuid(dump: Mapping | None) -> dict | None:
    if dump is None:
        return None
    decoded = cpuid_mod.decode_cpuid(dump)
    return {
        "entries": len(dump),
        "flags": decoded["flags"],
        "flags_by_register": decoded["flags_by_register"],
        "vmx": decoded["vmx"],
        "svm": decoded["svm"],
        "svm_features": decoded["svm_features"],
    }


def backend_kind(raw: RawCaps, cpu: Mapping | None) -> str | None:
    """Which kind of KVM serves the device: vmx, svm, nested-vmx, nested-svm, pvm, pyvt."""
    if raw.kvm.device.rstrip("/").endswith("/pyvt"):
        return "pyvt"
    nested = bool(cpu and cpu.get("hypervisor", {}).get("present"))
    if "kvm_pvm" in raw.modules:
        return "pvm"
    if "kvm_intel" in raw.modules:
        return "nested-vmx" if nested else "vmx"
    if "kvm_amd" in raw.modules:
        return "nested-svm" if nested else "svm"
    return None


_KIND_WORDS = {
    "pvm": "PVM (software-assisted KVM, kvm_pvm)",
    "vmx": "Intel VT-x (kvm_intel)",
    "svm": "AMD-V (kvm_amd)",
    "nested-vmx": "nested Intel VT-x (kvm_intel inside a VM)",
    "nested-svm": "nested AMD-V (kvm_amd inside a VM)",
    "pyvt": "the pyvt kernel module",
}


def _verdict(raw: RawCaps, cpu: Mapping | None, kind: str | None,
             feature_control: Mapping | None, vm_cr: Mapping | None) -> dict:
    k = raw.kvm
    has_vmx = bool(cpu and cpu.get("vmx"))
    has_svm = bool(cpu and cpu.get("svm"))
    if has_vmx:
        hw = "VT-x exposed to this machine"
    elif has_svm:
        hw = "AMD-V exposed to this machine"
    elif cpu is None:
        hw = "host CPUID unreadable"
    else:
        hw = "no VT-x/AMD-V exposed to this machine"
    problems: list[str] = []
    if feature_control and feature_control.get("state") == "disabled_by_firmware":
        problems.append(feature_control["explanation"])
    if vm_cr and vm_cr.get("disabled_by_firmware"):
        problems.append(vm_cr["explanation"])

    usable = k.status == "ok" and k.api_version == 12
    if usable:
        how = _KIND_WORDS.get(kind or "", "an unidentified KVM backend")
        line = f"KVM usable: yes, via {how}, {hw}"
    else:
        if k.status == "missing":
            reason = f"{k.device} does not exist"
            if has_vmx:
                problems.append("The CPU has VT-x: load kvm_intel (modprobe kvm_intel).")
            elif has_svm:
                problems.append("The CPU has AMD-V: load kvm_amd (modprobe kvm_amd).")
            elif "kvm_pvm" in raw.modules:
                problems.append("kvm_pvm is loaded: its device is normally /dev/kvm.")
            elif cpu is not None:
                problems.append("The CPU exposes neither VT-x nor AMD-V and no software KVM (PVM) is loaded.")
        elif k.status == "permission_denied":
            reason = f"no permission to open {k.device}"
            problems.append(f"Run as root or add the user to the group owning {k.device} (usually 'kvm').")
        elif k.status == "ok":
            reason = f"{k.device} speaks KVM API version {k.api_version}, expected 12"
        else:
            reason = f"{k.device} could not be used ({k.error})"
        line = f"KVM usable: no, {reason}; {hw}"
    return {"kvm_usable": usable, "kind": kind, "line": line, "problems": problems}


def _features(raw: RawCaps, report: Mapping) -> dict[str, bool | None]:
    """The flat feature table ``--require`` checks. ``None`` means unknown."""
    kvm = report["kvm"]
    caps = kvm["capabilities"]
    usable = report["verdict"]["kvm_usable"]
    cpu = report["host"]["cpu"]
    vmx_feat = (report.get("vmx") or {}).get("features") or {}
    svm_feat = (report.get("svm") or {}).get("features") or {}
    params = kvm["module_parameters"]

    def cap(name: str) -> bool | None:
        if not usable:
            return False
        return bool(caps.get(name)) if caps else None

    def param(module: str, name: str) -> bool | None:
        value = params.get(module, {}).get(name)
        if value is None:
            return None
        return value.strip() in ("Y", "1", "y")

    def used(hardware: bool | None, module_param: bool | None) -> bool | None:
        """Whether KVM guests get a feature: the hardware has it and the module did not turn it off."""
        if module_param is False:
            return False
        if hardware is not None:
            return hardware
        return module_param

    def any_module(*values: bool | None) -> bool | None:
        known = [v for v in values if v is not None]
        return any(known) if known else None

    supported = kvm.get("supported_cpuid") or {}
    sup_flags = supported.get("flags")
    max_vcpus = kvm.get("max_vcpus")

    f: dict[str, bool | None] = {
        "kvm": usable,
        "pvm": report["verdict"]["kind"] == "pvm",
        "hypervisor": bool(cpu and cpu["hypervisor"]["present"]) if cpu else None,
        "vmx": bool(cpu and cpu["vmx"]) if cpu else None,
        "svm": bool(cpu and cpu["svm"]) if cpu else None,
        "ept": used(vmx_feat.get("ept") if vmx_feat else None, param("kvm_intel", "ept")),
        "unrestricted_guest": used(vmx_feat.get("unrestricted_guest") if vmx_feat else None,
                                   param("kvm_intel", "unrestricted_guest")),
        "vpid": used(vmx_feat.get("vpid") if vmx_feat else None, param("kvm_intel", "vpid")),
        "npt": used(svm_feat.get("npt") if svm_feat else None, param("kvm_amd", "npt")),
        "nested": any_module(param("kvm_intel", "nested"), param("kvm_amd", "nested")),
        "irqchip": cap("KVM_CAP_IRQCHIP"),
        "ioeventfd": cap("KVM_CAP_IOEVENTFD"),
        "irqfd": cap("KVM_CAP_IRQFD"),
        "immediate_exit": cap("KVM_CAP_IMMEDIATE_EXIT"),
        "guest_debug": cap("KVM_CAP_SET_GUEST_DEBUG"),
        "coalesced_mmio": cap("KVM_CAP_COALESCED_MMIO"),
        "user_memory": cap("KVM_CAP_USER_MEMORY"),
        "nested_state": cap("KVM_CAP_NESTED_STATE"),
        "tsc_control": cap("KVM_CAP_TSC_CONTROL"),
        "smp": (max_vcpus >= 2 if max_vcpus else None) if usable else False,
        "long_mode": ("lm" in sup_flags if sup_flags is not None else None) if usable else False,
    }
    if not vmx_feat:
        # Without VMX MSRs, a machine whose CPUID lacks VMX has none of its features.
        for name in ("ept", "unrestricted_guest", "vpid"):
            if f[name] is None and cpu is not None and not cpu["vmx"] and "kvm_intel" not in raw.modules:
                f[name] = False
    if f["npt"] is None and cpu is not None and not cpu["svm"] and "kvm_amd" not in raw.modules:
        f["npt"] = False
    if f["nested"] is None and report["verdict"]["kind"] == "pvm":
        f["nested"] = False  # PVM offers its guests no VMX/SVM to nest with
    probe = report.get("probe")
    for name in PROBE_ONLY_FEATURES:
        f[name] = None if usable else False
    if probe:
        for result in probe["results"]:
            if result["name"] in PROBE_FEATURES:
                f[result["name"]] = result["status"] == "ok"
    return f


def evaluate_requirements(features: Mapping[str, bool | None],
                          capabilities: Mapping[str, int],
                          required: Iterable[str]) -> dict:
    """Check ``--require`` names against the feature table.

    A name is a feature key (``ept``, ``irqchip`` ...) or a ``KVM_CAP_*``
    name (holds when its value is non-zero). Unknown values count as
    missing; unknown names are reported separately.
    """
    required = list(required)
    missing: list[str] = []
    unknown_names: list[str] = []
    undetermined: list[str] = []
    for name in required:
        key = name.strip()
        if key.upper().startswith("KVM_CAP_"):
            if key.upper() not in capabilities and capabilities:
                unknown_names.append(name)
                missing.append(name)
            elif not capabilities.get(key.upper()):
                missing.append(name)
            continue
        key = key.lower().replace("-", "_")
        if key not in features:
            unknown_names.append(name)
            missing.append(name)
        elif features[key] is None:
            undetermined.append(name)
            missing.append(name)
        elif not features[key]:
            missing.append(name)
    return {
        "required": required,
        "missing": missing,
        "unknown_names": unknown_names,
        "undetermined": undetermined,
        "satisfied": not missing,
    }


# --- the report ---------------------------------------------------------------

def build_report(raw: RawCaps, require: Iterable[str] | None = None,
                 now: datetime.datetime | None = None) -> dict:
    """Decode *raw* into the schema documented in ``pyvt/caps/SCHEMA.md``."""
    cpu = cpuid_mod.decode_cpuid(raw.host_cpuid) if raw.host_cpuid else None
    if cpu is not None:
        cpu["source"] = raw.host_cpuid_source

    msr_sources = _msr_sources(raw)
    vmx_report = None
    feature_control = None
    for source, msrs in msr_sources:
        if vmx_mod.IA32_VMX_BASIC in msrs:
            vmx_report = vmx_mod.decode_vmx(msrs)
            vmx_report["source"] = source
            break
    for source, msrs in msr_sources:
        if IA32_FEATURE_CONTROL in msrs and source != SOURCE_KVM_FEATURE_MSRS:
            feature_control = decode_feature_control(msrs[IA32_FEATURE_CONTROL])
            feature_control["source"] = source
            break
    if vmx_report is None and cpu is not None and cpu["vmx"]:
        vmx_report = {"present": True, "source": None,
                      "note": "CPUID reports VMX but no source could read the VMX capability MSRs "
                              "(load the msr module and run as root, or enable nested on the host)."}
    if vmx_report is not None:
        vmx_report["feature_control"] = feature_control
        vmx_report.setdefault("features", {"vmx": True})

    svm_report = None
    vm_cr = None
    for source, msrs in msr_sources:
        if svm_mod.MSR_VM_CR in msrs:
            vm_cr = svm_mod.decode_vm_cr(msrs[svm_mod.MSR_VM_CR])
            vm_cr["source"] = source
            break
    if cpu is not None and cpu["svm"]:
        svm_report = {
            "source": SOURCE_HOST_CPUID,
            "cpuid": cpu["svm_features"],
            "vm_cr": vm_cr,
            "features": svm_mod.svm_features(cpu["svm_features"]),
        }

    kind = backend_kind(raw, cpu)
    verdict = _verdict(raw, cpu, kind, feature_control, vm_cr)
    hw_summary = _hw_caps_summary(raw.pyvt_hw_caps)
    if hw_summary and not hw_summary["cpus_consistent"]:
        verdict["problems"].append(
            "CPUs report different virtualization registers (CPUs "
            + ", ".join(map(str, hw_summary["differing_cpus"]))
            + " differ from CPU 0): check the firmware's virtualization setting.")
    now = now or datetime.datetime.now(datetime.timezone.utc)

    sources = [
        _source_entry(SOURCE_HOST_CPUID, raw.host_cpuid, raw.host_cpuid_error,
                      raw.host_cpuid_source or "host CPUID"),
        _source_entry(SOURCE_MSR_DEVICE, raw.msr_device, raw.msr_device_error, "/dev/cpu/0/msr"),
        _source_entry(SOURCE_KVM_FEATURE_MSRS, raw.kvm_feature_msrs, raw.kvm_feature_msrs_error,
                      "KVM_GET_MSR_FEATURE_INDEX_LIST + KVM_GET_MSRS on the system fd"),
        _source_entry(SOURCE_PYVT_HW_CAPS, raw.pyvt_hw_caps, raw.pyvt_hw_caps_error,
                      "PYVT_GET_HW_CAPS on /dev/pyvt"),
        {"name": SOURCE_KVM, "status": "ok" if raw.kvm.status == "ok" else "unavailable",
         "detail": raw.kvm.error or f"{raw.kvm.device} via {raw.kvm.interface}"},
        _source_entry(SOURCE_KVM_MODULE_PARAMETERS, raw.modules, None, "/sys/module/kvm*/parameters"),
    ]
    if raw.probe is not None:
        sources.append({"name": SOURCE_PROBE, "status": "ok", "detail": "tiny guests run on " + raw.kvm.device})

    report: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "tool": {"name": "pyvt caps", "version": raw.tool_version},
        "generated_at": now.isoformat(timespec="seconds"),
        "verdict": verdict,
        "host": {"kernel": raw.kernel, "kvm_modules": sorted(raw.modules), "cpu": cpu,
                 "pyvt_hw_caps": _hw_caps_summary(raw.pyvt_hw_caps)},
        "sources": sources,
        "vmx": vmx_report,
        "svm": svm_report,
        "kvm": _decode_kvm(raw.kvm, raw.modules, raw.kvm_feature_msrs),
        "probe": {"results": raw.probe} if raw.probe is not None else None,
        "features": {},
        "requirements": None,
    }
    report["features"] = _features(raw, report)
    if require is not None:
        report["requirements"] = evaluate_requirements(
            report["features"], report["kvm"]["capabilities"], require)
    return report


def exit_status(report: Mapping) -> int:
    """0 when KVM is usable (or every ``--require`` holds), else 1."""
    req = report.get("requirements")
    if req is not None:
        return 0 if req["satisfied"] else 1
    return 0 if report["verdict"]["kvm_usable"] else 1


# --- text rendering ----------------------------------------------------------

def _yn(value: bool | None) -> str:
    return {True: "yes", False: "no", None: "unknown"}[value]


def render_text(report: Mapping, verbose: bool = False) -> str:
    """The human-readable report: verdict first, then one section per subject."""
    lines: list[str] = [report["verdict"]["line"]]
    for problem in report["verdict"]["problems"]:
        lines.append(f"  ! {problem}")
    req = report.get("requirements")
    if req is not None:
        if req["satisfied"]:
            lines.append(f"Requirements: all met ({', '.join(req['required'])})")
        else:
            lines.append(f"Requirements: MISSING {', '.join(req['missing'])}")
            if req["unknown_names"]:
                lines.append(f"  unknown feature names: {', '.join(req['unknown_names'])}")
            if req["undetermined"]:
                lines.append(f"  could not be determined here: {', '.join(req['undetermined'])}")

    cpu = report["host"]["cpu"]
    lines.append("")
    lines.append("Host CPU")
    if cpu is None:
        lines.append("  CPUID: unavailable")
    else:
        sig = cpu["signature"] or {}
        lines.append(f"  vendor: {cpu['vendor']}  brand: {cpu['brand'] or '?'}")
        lines.append(f"  family {sig.get('family')} model {sig.get('model')} stepping {sig.get('stepping')}"
                     f"  ({sig.get('raw')})  [source: {cpu.get('source')}]")
        lines.append(f"  vmx: {_yn(cpu['vmx'])}  svm: {_yn(cpu['svm'])}")
        hv = cpu["hypervisor"]
        if hv["present"]:
            lines.append(f"  running under a hypervisor: {hv['name'] or 'unknown'}"
                         f" (signature {hv['signature']!r})")
        else:
            lines.append("  running under a hypervisor: no")
    lines.append(f"  kernel: {report['host']['kernel']}  KVM modules: {', '.join(report['host']['kvm_modules']) or 'none'}")
    hw = report["host"].get("pyvt_hw_caps")
    if hw:
        same = "all report the same registers" if hw["cpus_consistent"] else \
            f"CPUs {', '.join(map(str, hw['differing_cpus']))} differ from CPU 0"
        lines.append(f"  /dev/pyvt: ABI {hw['abi_version']}, {hw['vendor']}, {hw['nr_cpus']} CPUs ({same}), "
                     f"nested paging {hw['npt_levels']} levels")

    lines.append("")
    lines.append("Sources")
    for s in report["sources"]:
        lines.append(f"  {s['name']:<22} {s['status']:<12} {s['detail']}")

    vmx = report.get("vmx")
    if vmx:
        lines.append("")
        lines.append(f"Intel VMX  [source: {vmx.get('source')}{_SOURCE_NOTES.get(vmx.get('source') or '', '')}]")
        fc = vmx.get("feature_control")
        if fc:
            lines.append(f"  IA32_FEATURE_CONTROL {fc['raw']}: {fc['explanation']}")
        if vmx.get("note"):
            lines.append(f"  {vmx['note']}")
        if "basic" in vmx:
            b = vmx["basic"]
            lines.append(f"  VMCS revision {b['vmcs_revision_id']}, region {b['vmcs_region_size']} bytes, "
                         f"memory type {b['vmcs_memory_type']}, TRUE controls: {_yn(b['true_controls'])}")
        for section, title in (("pin_based_controls", "Pin-based controls"),
                               ("primary_processor_based_controls", "Primary processor-based controls"),
                               ("secondary_processor_based_controls", "Secondary processor-based controls"),
                               ("tertiary_processor_based_controls", "Tertiary processor-based controls"),
                               ("vm_exit_controls", "VM-exit controls"),
                               ("vm_entry_controls", "VM-entry controls")):
            if section in vmx:
                lines.append(f"  {title} ({vmx[section]['raw']})")
                for c in vmx[section]["controls"]:
                    lines.append(f"    {c['name']:<45} {_setting_word(c['setting'])}")
        if "misc" in vmx:
            m = vmx["misc"]
            lines.append(f"  Misc: preemption timer TSC>>{m['preemption_timer_tsc_shift']}, "
                         f"activity states {', '.join(m['activity_states']) or 'none'}, "
                         f"CR3 targets {m['cr3_target_count']}, MSR list max {m['max_msr_list_entries']}")
        for key, title in (("cr0_fixed", "CR0"), ("cr4_fixed", "CR4")):
            if key in vmx:
                fx = vmx[key]
                lines.append(f"  {title} in VMX operation: must be 1: {' '.join(fx['must_be_1']) or '-'};  "
                             f"must be 0: {' '.join(fx['must_be_0']) or '-'}")
        if vmx.get("features", {}).get("unrestricted_guest") and "cr0_fixed" in vmx:
            lines.append("    (with unrestricted guest, the guest's CR0.PE and CR0.PG may be 0)")
        if "ept_vpid" in vmx:
            lines.append("  EPT/VPID capabilities:")
            lines.extend(_wrap([c + "," for c in vmx["ept_vpid"]["capabilities"]], "    "))
        if "vm_functions" in vmx:
            lines.append("  VM functions: " + (", ".join(vmx["vm_functions"]["functions"]) or "none"))

    svm = report.get("svm")
    if svm:
        lines.append("")
        lines.append(f"AMD SVM  [source: {svm['source']}]")
        c = svm.get("cpuid")
        if c:
            lines.append(f"  revision {c['revision']}, {c['nasid']} ASIDs")
            lines.append("  features: " + ", ".join(c["features"]))
        if svm.get("vm_cr"):
            lines.append(f"  VM_CR {svm['vm_cr']['raw']}: {svm['vm_cr']['explanation']}")

    kvm = report["kvm"]
    lines.append("")
    lines.append(f"KVM  [{kvm['device']}: {kvm['status']}]")
    if kvm["status"] == "ok":
        lines.append(f"  API version {kvm['api_version']}, max vCPUs {kvm['max_vcpus']}, "
                     f"max memslots {kvm['max_memslots']}, vcpu mmap size {kvm['vcpu_mmap_size']}")
        caps = kvm["capabilities"]
        on = [f"{k[len('KVM_CAP_'):]}={v}" if v != 1 else k[len("KVM_CAP_"):] for k, v in caps.items() if v]
        off = [k[len("KVM_CAP_"):] for k, v in caps.items() if not v]
        lines.append(f"  capabilities ({len(on)} of {len(caps)} known to the headers):")
        lines.extend(_wrap(on, "    "))
        if verbose:
            lines.append("  not supported:")
            lines.extend(_wrap(off, "    "))
        sup = kvm.get("supported_cpuid")
        if sup:
            lines.append(f"  supported CPUID: {sup['entries']} entries, vmx: {_yn(sup['vmx'])}, svm: {_yn(sup['svm'])}")
            if verbose:
                lines.extend(_wrap(sup["flags"], "    "))
        if kvm.get("msr_index_list") is not None:
            lines.append(f"  MSR index list: {len(kvm['msr_index_list'])} MSRs; feature MSRs: "
                         f"{len(kvm['msr_feature_index_list'] or [])}")
        for module, params in kvm["module_parameters"].items():
            shown = " ".join(f"{k}={v}" for k, v in params.items())
            lines.append(f"  {module}: {shown}" if shown else f"  {module}: (no parameters)")
    elif kvm.get("error"):
        lines.append(f"  {kvm['error']}")

    probe = report.get("probe")
    if probe:
        lines.append("")
        lines.append("Probe (tiny guests)")
        for r in probe["results"]:
            lines.append(f"  {r['name']:<16} {r['status']:<12} {r.get('detail', '')}")

    lines.append("")
    lines.append("Features")
    lines.extend(_wrap([f"{k}={_yn(v)}" for k, v in report["features"].items()], "  "))
    return "\n".join(lines) + "\n"


_SOURCE_NOTES = {
    SOURCE_KVM_FEATURE_MSRS: ", what KVM offers a nested guest",
    SOURCE_MSR_DEVICE: ", the host CPU's own registers",
    SOURCE_PYVT_HW_CAPS: ", the host CPU's own registers read by pyvt.ko",
}


def _setting_word(setting: str) -> str:
    return {"flexible": "yes", "must_be_1": "forced on", "must_be_0": "no",
            "inconsistent": "inconsistent"}[setting]


def _wrap(words: list[str], indent: str, width: int = 100) -> list[str]:
    out: list[str] = []
    line = indent
    for w in words:
        if len(line) + len(w) + 1 > width and line.strip():
            out.append(line.rstrip())
            line = indent
        line += w + " "
    if line.strip():
        out.append(line.rstrip())
    return out
