"""--probe: tiny guests on the real backend, and how probe failures are reported."""

import io
import json

import pytest

from pyvt.caps import probe
from pyvt.caps.cli import main


def vm_api_available() -> bool:
    try:
        import pyvt
        return hasattr(pyvt, "Vm")
    except Exception:
        return False


needs_vm_api = pytest.mark.skipif(not vm_api_available(), reason="pyvt.Vm (the library's VM API) is not importable")


@needs_vm_api
def test_every_probe_passes_on_this_machine(real_kvm):
    """This machine's KVM runs all three modes, an irqchip, 2 vCPUs, PIO/MMIO exits and single-step."""
    results = {r["name"]: r for r in probe.run_probe(real_kvm)}
    assert sorted(results) == sorted(["real_mode", "protected_mode", "long_mode", "irqchip", "smp",
                                      "pio_exit", "mmio_exit", "single_step", "ring3"])
    not_ok = {n: r["detail"] for n, r in results.items() if r["status"] != "ok"}
    assert not not_ok
    assert results["pio_exit"]["median_round_trip_us"] > 0  # a measurement, never a time limit
    assert results["pio_exit"]["samples"] == probe.PIO_ROUND_TRIPS - 1
    ring3 = results["ring3"]
    assert ring3["cpl0_ns_per_round"] > 0 and ring3["cpl3_ns_per_round"] > 0
    assert ring3["cpl0_emulated"] == (
        ring3["cpl0_ns_per_round"] > probe.EMULATED_RATIO * ring3["cpl3_ns_per_round"])
    assert ("CPL 0 is emulated" in ring3["detail"]) == ring3["cpl0_emulated"]


@needs_vm_api
def test_require_of_a_probe_feature_runs_the_probe(real_kvm):
    out = io.StringIO()
    status = main(["--json", "--device", real_kvm, "--require", "real_mode", "single_step"], stdout=out)
    doc = json.loads(out.getvalue())
    assert status == 0, doc["requirements"]
    assert [r["name"] for r in doc["probe"]["results"]][:3] == ["real_mode", "protected_mode", "long_mode"]
    assert doc["features"]["real_mode"] is True


def test_missing_vm_api_is_unsupported(monkeypatch):
    def broken(device):
        raise ImportError("no module named pyvt._native")
    monkeypatch.setattr(probe, "_Probe", broken)
    [row] = probe.run_probe("/dev/kvm")
    assert row["status"] == "unsupported" and "ImportError" in row["detail"]


class _FakeProbe:
    """Stands in for the real probe to check how exceptions are classified."""
    pyvt = type("pyvt", (), {"Error": OSError})

    def mode(self, mode):
        if mode == "real":
            raise OSError(22, "Invalid argument")  # the backend refused: unsupported, with errno
        if mode == "protected":
            raise RuntimeError("guest state went wrong")  # broke: failed
        return probe._result("long_mode", "ok", "")

    def __getattr__(self, name):
        return lambda: probe._result(name, "ok", "")


def test_exceptions_become_rows(monkeypatch):
    monkeypatch.setattr(probe, "_Probe", lambda device: _FakeProbe())
    rows = {r["name"]: r for r in probe.run_probe("/dev/kvm")}
    assert rows["real_mode"]["status"] == "unsupported" and "errno 22, EINVAL" in rows["real_mode"]["detail"]
    assert rows["protected_mode"]["status"] == "failed" and "RuntimeError" in rows["protected_mode"]["detail"]
    assert rows["long_mode"]["status"] == "ok"


def test_guest_code_bytes():
    # mov al, 0x42 ; out 0x10, al ; hlt
    assert probe.OUT_THEN_HLT == bytes.fromhex("b042e610f4")
    # mov byte [0x00400000], 0x42 ; hlt
    assert probe.MMIO_WRITE_THEN_HLT == bytes.fromhex("c6050000400042f4")


def test_spin_loop_bytes_are_what_the_assembler_makes():
    import pyvt
    source = "mov $0, %ecx\n1: xor %ecx, %eax\nrol $7, %eax\ndec %ecx\njnz 1b\nhlt\n"
    assert probe._SPIN == pyvt.assemble(source, bits=64)
