"""The command line: python -m pyvt run / version (caps: tests/caps)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import pyvt

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "hello.S"
# Children start beside the package under test, so they import it (and not
# an unbuilt checkout).
PACKAGE_PARENT = os.path.dirname(os.path.dirname(pyvt.__file__))


def pyvt_cli(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "pyvt", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=PACKAGE_PARENT)


def test_version():
    out = pyvt_cli("version")
    assert out.returncode == 0 and out.stdout.startswith(f"pyvt {pyvt.__version__}")


@pytest.mark.requires_kvm
def test_run_assembly_source_streams_console_and_exits_0():
    if not EXAMPLE.exists():
        pytest.skip("examples/ is not beside the tests")
    out = pyvt_cli("run", EXAMPLE, "--mode", "long")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "hello from a pyvt guest\n"
    assert out.stderr.startswith("pyvt: Hlt(")


@pytest.mark.requires_kvm
@pytest.mark.parametrize("name,mode,args,status,stderr", [
    ("debug_exit", "long", [], 85, "DebugExit(code=0x2a"),
    ("spin", "long", ["--timeout", "0.2"], 124, "Timeout(0.2s"),
    ("triple_fault", "long", [], 1, "triple-faulted"),
    ("uart_hello_real", "real", [], 0, "Hlt("),
    ("port_io", "protected", [], 1, "Io(out port=0x10"),
])
def test_run_exit_statuses(guest, tmp_path, name, mode, args, status, stderr):
    image = tmp_path / f"{name}.bin"
    image.write_bytes(guest(name))
    out = pyvt_cli("run", image, "--mode", mode, *args)
    assert out.returncode == status, out.stderr
    assert stderr in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("args,message", [
    (["run", "/nonexistent.bin"], "cannot read /nonexistent.bin"),
    (["run", "/dev/null"], "is empty"),
    (["run", "guest.bin", "--backend", "/nonexistent/kvm"], "/nonexistent/kvm does not exist"),
    (["run", "guest.bin", "--memory", "3K"], "not a multiple of the page size"),
    (["run", "guest.bin", "--at", "zero"], "not a number"),
    (["run", "bad.S"], "assembling bad failed"),
])
def test_bad_input_exits_2_with_a_message(tmp_path, args, message):
    (tmp_path / "guest.bin").write_bytes(b"\xf4")
    (tmp_path / "bad.S").write_text("_start: frobnicate\n")
    args = [str(tmp_path / a) if a in ("guest.bin", "bad.S") else a for a in args]
    out = pyvt_cli(*args)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert message in out.stderr
    assert "Traceback" not in out.stderr
