"""The command line: exit statuses, --json, --require, and no tracebacks on a bad device."""

import io
import json
import os
import pathlib
import subprocess
import sys

import pytest
from capsfixtures import PVM_HOST

from pyvt.caps import report as rep
from pyvt.caps.cli import main

import pyvt

# Child interpreters start here, so they import the pyvt under test (an
# installed one) and not the uncompiled source tree of the checkout.
PACKAGE_PARENT = os.path.dirname(os.path.dirname(pyvt.__file__))

SCHEMA = pathlib.Path(rep.__file__).with_name("report.schema.json")


def run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    status = main(list(argv), stdout=out)
    return status, out.getvalue()


def test_missing_device_text():
    status, out = run("--device", "/nonexistent")
    assert status == 1
    assert out.splitlines()[0].startswith("KVM usable: no, /nonexistent does not exist")
    assert "KVM  [/nonexistent: missing]" in out


def test_missing_device_json_is_valid():
    jsonschema = pytest.importorskip("jsonschema")
    status, out = run("--json", "--device", "/nonexistent")
    assert status == 1
    doc = json.loads(out)
    jsonschema.validate(doc, json.loads(SCHEMA.read_text()))
    assert doc["kvm"]["status"] == "missing" and doc["kvm"]["errno"] == 2
    assert doc["verdict"]["kvm_usable"] is False


def test_missing_device_require_lists_everything_missing():
    status, out = run("--device", "/nonexistent", "--require", "kvm", "irqchip")
    assert status == 1
    assert "Requirements: MISSING kvm, irqchip" in out


def test_missing_device_probe_is_skipped_not_crashed():
    status, out = run("--device", "/nonexistent", "--probe", "--json")
    doc = json.loads(out)
    assert status == 1
    assert doc["probe"]["results"][0]["status"] == "skipped"


def test_not_a_kvm_device_is_an_error_not_a_traceback(tmp_path):
    fake = tmp_path / "kvm"
    fake.write_bytes(b"")
    status, out = run("--device", str(fake), "--json")
    doc = json.loads(out)
    assert status == 1
    assert doc["kvm"]["status"] == "error"
    assert doc["verdict"]["line"].startswith("KVM usable: no, ")


def test_usage_errors_and_help():
    assert main(["--no-such-option"], stdout=io.StringIO()) == 2
    assert main(["--require"], stdout=io.StringIO()) == 2
    assert main(["--help"], stdout=io.StringIO()) == 0


def test_module_entry_point_has_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "pyvt.caps", "--device", "/nonexistent"],
                          cwd=PACKAGE_PARENT, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr + proc.stdout
    assert proc.stdout.startswith("KVM usable: no, /nonexistent does not exist")


# A read-only sysfs attribute refuses O_RDWR with EACCES even for root
# (kernfs checks the write bits itself), so it stands in for a /dev/kvm the
# user may not open, without dropping privileges.
READ_ONLY_ATTRIBUTE = "/sys/kernel/uevent_seqnum"


@pytest.mark.skipif(not os.path.exists(READ_ONLY_ATTRIBUTE), reason="needs sysfs")
def test_permission_denied():
    status, out = run("--json", "--device", READ_ONLY_ATTRIBUTE)
    doc = json.loads(out)
    assert status == 1
    assert doc["kvm"]["status"] == "permission_denied" and doc["kvm"]["errno"] == 13
    assert doc["verdict"]["line"].startswith(f"KVM usable: no, no permission to open {READ_ONLY_ATTRIBUTE}")
    status, out = run("--device", READ_ONLY_ATTRIBUTE)
    assert status == 1 and "Run as root or add the user to the group" in out


def test_require_on_this_machine(real_kvm):
    status, out = run("--device", real_kvm, "--require", "kvm", "irqchip", "smp", "long_mode")
    assert status == 0, out
    assert "Requirements: all met" in out


@pytest.mark.skipif(not PVM_HOST, reason="PVM-specific: VT-x features are absent")
def test_require_ept_fails_on_pvm(real_kvm):
    status, out = run("--device", real_kvm, "--require", "ept", "irqchip")
    assert status == 1
    assert "Requirements: MISSING ept" in out


def test_python_dash_m_pyvt_caps():
    proc = subprocess.run([sys.executable, "-m", "pyvt", "caps", "--device", "/nonexistent"],
                          cwd=PACKAGE_PARENT, capture_output=True, text=True, timeout=120, check=False)
    assert "Traceback" not in proc.stderr + proc.stdout
    assert proc.returncode == 1
    assert proc.stdout.startswith("KVM usable: no, /nonexistent does not exist")
