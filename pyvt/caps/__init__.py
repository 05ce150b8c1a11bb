"""Host virtualization capabilities: ``pyvt caps``.

Decoders (pure functions over raw register values):

- :mod:`pyvt.caps.vmx` -- Intel VMX capability MSRs (SDM Appendix A)
- :mod:`pyvt.caps.svm` -- AMD SVM CPUID leaf 8000_000Ah and VM_CR
- :mod:`pyvt.caps.cpuid` -- vendor, signature, feature flags, hypervisor
- :mod:`pyvt.caps.feature_control` -- IA32_FEATURE_CONTROL

Report: :mod:`pyvt.caps.collect` reads the machine, :mod:`pyvt.caps.report`
builds the JSON document described in ``SCHEMA.md``, :mod:`pyvt.caps.probe`
runs tiny guests, :mod:`pyvt.caps.cli` is the command line.
"""

from .report import (
    SCHEMA_VERSION,
    KvmRaw,
    RawCaps,
    build_report,
    evaluate_requirements,
    render_text,
)

__all__ = [
    "SCHEMA_VERSION",
    "KvmRaw",
    "RawCaps",
    "build_report",
    "collect_report",
    "evaluate_requirements",
    "main",
    "render_text",
]


def main(argv=None) -> int:
    """Entry point for ``python -m pyvt caps``; see :func:`pyvt.caps.cli.main`."""
    from .cli import main as _main
    return _main(argv)


def collect_report(device: str = "/dev/kvm", probe: bool = False, require=None) -> dict:
    """Collect and build the report for this machine (what ``pyvt caps --json`` prints)."""
    from .collect import collect
    raw = collect(device=device)
    if probe and raw.kvm.status == "ok":
        from .probe import run_probe
        raw.probe = run_probe(device)
    return build_report(raw, require=require)
