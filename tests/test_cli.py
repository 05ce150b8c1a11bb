"""The command line: python -m pyvt run / version (caps: tests/caps; boot:
tests/test_boot.py)."""

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

import pyvt
from pyvt.cli import _parser

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "hello.S"
# Children start beside the package under test, so they import it (and not
# an unbuilt checkout).
PACKAGE_PARENT = os.path.dirname(os.path.dirname(pyvt.__file__))
PYVT = [sys.executable, "-m", "pyvt"]


def pyvt_cli(*args, timeout=60, **kw):
    """``python -m pyvt ARGS``; ``kw`` goes to subprocess.run (text unless
    ``text=False``, output captured unless redirected)."""
    kw.setdefault("text", True)
    if "stdout" not in kw and "stderr" not in kw:
        kw["capture_output"] = True
    return subprocess.run([*PYVT, *map(str, args)], timeout=timeout, cwd=PACKAGE_PARENT, **kw)


def one_line_error(out, status=2):
    """The run ended with ``status`` and one ``pyvt:`` line on stderr."""
    assert out.returncode == status, (out.stdout, out.stderr)
    assert "Traceback" not in out.stderr
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyvt: "), out.stderr
    return lines[0]


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
    (["run", "/nonexistent.bin"], "cannot read guest code /nonexistent.bin: No such file"),
    (["run", "/"], "cannot read guest code /: Is a directory"),
    (["run", "guest.bin", "--at", "-1"], "an address must not be negative"),
    (["run", "guest.bin", "--at", "0x1000000"], "--at 0x1000000 is beyond the guest's 16M"),
    (["run", "guest.bin", "--timeout", "nan"], "not a number of seconds: 'nan'"),
    (["run", "guest.bin", "--timeout", "-0.5"], "a timeout must not be negative"),
    (["run", "guest.bin", "--timeout=-inf"], "a timeout must not be negative"),
    (["run", "guest.bin", "--timeout", "soon"], "not a number of seconds: 'soon'"),
    (["run"], "the following arguments are required: file (see 'pyvt run --help')"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["run", "/dev/null"], "is empty"),
    (["run", "guest.bin", "--backend", "/nonexistent/kvm"], "/nonexistent/kvm does not exist"),
    (["run", "guest.bin", "--memory", "3K"], "not a multiple of the page size"),
    (["run", "guest.bin", "--at", "zero"], "not a number"),
])
def test_bad_input_exits_2_with_a_message(tmp_path, args, message):
    (tmp_path / "guest.bin").write_bytes(b"\xf4")
    args = [str(tmp_path / a) if a == "guest.bin" else a for a in args]
    out = pyvt_cli(*args)
    assert message in one_line_error(out)


def test_assembler_errors_exit_2_with_its_messages(tmp_path):
    (tmp_path / "bad.S").write_text("_start: frobnicate\n")
    out = pyvt_cli("run", tmp_path / "bad.S")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.startswith("pyvt: assembling bad failed:")
    assert "no such instruction: `frobnicate'" in out.stderr  # as's own lines follow


# -- input size: checked against guest RAM before the input is read ------------

def _address_space_limit():
    # 400 MB: room for pyvt and a 16M guest, not for a 1 GiB input; a pyvt
    # that read it all would fail here rather than eat the machine's memory.
    resource.setrlimit(resource.RLIMIT_AS, (400 << 20, 400 << 20))


def test_run_ring_3_runs_the_example_at_cpl_3(tmp_path):
    out = pyvt_cli("run", EXAMPLE, "--ring", "3")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "hello from a pyvt guest\n"
    assert "Hlt" in out.stderr


def test_run_ring_3_reports_a_guest_exception_and_fails(tmp_path):
    (tmp_path / "fault.S").write_text("_start: movabs $0x123456789000, %rax\nmovq $1, (%rax)\n")
    out = pyvt_cli("run", tmp_path / "fault.S", "--ring", "3")
    line = one_line_error(out, status=1)
    assert "#PF" in line and "cr2=0x123456789000" in line and "rip=0x100a" in line


@pytest.mark.parametrize("args,message", [
    (["--ring", "3", "--mode", "real"], "ring 3 needs mode='long'"),
    (["--ring", "1"], "invalid choice: 1"),
])
def test_run_refuses_a_bad_ring(tmp_path, args, message):
    out = pyvt_cli("run", EXAMPLE, *args)
    assert message in one_line_error(out)


@pytest.mark.requires_kvm
@pytest.mark.parametrize("args,message", [
    (["run", "/dev/zero"], "guest code /dev/zero is larger than the 0xfff000 bytes"),
    (["run", "sparse.bin"], "(1073741824 bytes) is larger than the 0xfff000 bytes"),
    (["run", "sparse.S"], "(1073741824 bytes) is larger than the 0xfff000 bytes"),
])
def test_run_refuses_input_larger_than_guest_ram_without_reading_it(tmp_path, args, message):
    for name in ("sparse.bin", "sparse.S"):
        os.truncate(os.open(tmp_path / name, os.O_CREAT | os.O_WRONLY), 1 << 30)
    args = [str(tmp_path / a) if a.startswith("sparse") else a for a in args]
    out = pyvt_cli(*args, "--memory", "16M", "--timeout", 5, preexec_fn=_address_space_limit)
    assert message in one_line_error(out)


@pytest.mark.requires_kvm
@pytest.mark.parametrize("source", ["file", "pipe"])
def test_run_takes_input_up_to_the_ram_above_the_load_address(tmp_path, source):
    room = (16 << 20) - pyvt.LOAD_ADDRESS
    for size in (room, room + 1):
        code = b"\xf4".ljust(size, b"\0")  # hlt, then zeros up to the size
        if source == "file":
            (tmp_path / "code.bin").write_bytes(code)
            out = pyvt_cli("run", tmp_path / "code.bin", "--memory", "16M", "--timeout", 20)
        else:
            out = pyvt_cli("run", "/dev/stdin", "--memory", "16M", "--timeout", 20,
                           input=code, text=False)
            out.stderr = out.stderr.decode()
        if size == room:
            assert out.returncode == 0 and out.stderr.startswith("pyvt: Hlt("), out.stderr
        else:
            assert "is larger than the 0xfff000 bytes of guest RAM" in one_line_error(out)


# -- file names and contents in any bytes -----------------------------------------

@pytest.mark.requires_kvm
def test_run_a_file_whose_name_is_not_utf8(tmp_path, guest):
    image = os.path.join(os.fsencode(tmp_path), b"code\xff.bin")
    with open(image, "wb") as f:
        f.write(guest("uart_hello_long"))
    out = subprocess.run([*PYVT, b"run", image], capture_output=True, timeout=60,
                         cwd=PACKAGE_PARENT)
    assert out.returncode == 0, out.stderr
    assert out.stdout == b"hello from long mode\n"
    source = os.path.join(os.fsencode(tmp_path), b"hello\xff.S")
    with open(source, "wb") as f:
        f.write(EXAMPLE.read_bytes() if EXAMPLE.exists() else b".code64\nhlt\n")
    out = subprocess.run([*PYVT, b"run", source], capture_output=True, timeout=60,
                         cwd=PACKAGE_PARENT)
    assert out.returncode == 0 and b"Traceback" not in out.stderr, out.stderr


def test_run_passes_non_utf8_bytes_of_an_assembly_source_to_the_guest(tmp_path):
    # One rule with pyvt.assemble_file: the assembler reads bytes, so a
    # Latin-1 string reaches guest memory (and the UART) as it is in the file.
    source = EXAMPLE.read_bytes().replace(b"hello from a pyvt guest", b"caf\xe9 # \xff")
    assert b"caf\xe9" in source
    (tmp_path / "latin1.S").write_bytes(source)
    out = pyvt_cli("run", tmp_path / "latin1.S", text=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout == b"caf\xe9 # \xff\n"


# -- --timeout -------------------------------------------------------------------

@pytest.mark.parametrize("text,seconds", [
    ("0", 0.0), ("0.25", 0.25), ("1e30", 1e30), ("inf", None), ("Infinity", None),
    ("1e400", None),  # beyond a double: as inf
])
def test_timeout_values_reach_the_library_as_they_are(text, seconds):
    assert _parser().parse_args(["run", "x.bin", "--timeout", text]).timeout == seconds
    assert _parser().parse_args(["boot", "k", "--timeout", text]).timeout == seconds


@pytest.mark.requires_kvm
@pytest.mark.parametrize("timeout", ["inf", "1e30", "2e10"])
def test_huge_timeouts_run_the_guest_without_a_limit(tmp_path, guest, timeout):
    image = tmp_path / "hello.bin"
    image.write_bytes(guest("uart_hello_long"))
    out = pyvt_cli("run", image, "--timeout", timeout)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "hello from long mode\n" and out.stderr.startswith("pyvt: Hlt(")


# -- closed and broken standard streams --------------------------------------------

def pyvt_with_closed(fds, *args, **kw):
    """pyvt started with the shell's ``fds`` (e.g. ``>&-``) closing its
    standard streams."""
    return subprocess.run(["sh", "-c", f'exec "$@" {fds}', "sh", *PYVT, *map(str, args)],
                          capture_output=True, text=True, timeout=60, cwd=PACKAGE_PARENT, **kw)


@pytest.mark.requires_kvm
def test_run_with_stdout_closed_runs_the_guest(tmp_path):
    (tmp_path / "hello.S").write_text(
        '.code64\n_start: mov $0x3f8, %dx\n mov $0x41, %al\n out %al, %dx\n hlt\n')
    out = pyvt_with_closed(">&-", "run", tmp_path / "hello.S")
    assert out.returncode == 0 and out.stderr.startswith("pyvt: Hlt("), out.stderr
    out = pyvt_with_closed(">&- <&-", "run", tmp_path / "hello.S")
    assert out.returncode == 0 and out.stderr.startswith("pyvt: Hlt("), out.stderr


@pytest.mark.requires_kvm
def test_run_with_stderr_closed_keeps_stdout_for_the_guest(tmp_path, guest):
    image = tmp_path / "hello.bin"
    image.write_bytes(guest("uart_hello_long"))
    out = pyvt_with_closed("2>&-", "run", image)
    assert out.returncode == 0, out.stdout
    assert out.stdout == "hello from long mode\n"  # and not pyvt's own lines
    out = pyvt_with_closed("2>&-", "run", tmp_path / "missing.bin")
    assert out.returncode == 2 and out.stdout == ""


def _run_into_a_broken_pipe(*args):
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has gone before pyvt writes
    try:
        return pyvt_cli(*args, stdout=write_end, stderr=subprocess.PIPE)
    finally:
        os.close(write_end)


@pytest.mark.requires_kvm
def test_run_into_a_broken_pipe_lets_the_guest_finish(tmp_path, guest):
    image = tmp_path / "hello.bin"
    image.write_bytes(guest("uart_hello_long"))  # prints, then hlt
    out = _run_into_a_broken_pipe("run", image)
    assert one_line_error(out, 0).startswith("pyvt: Hlt(")  # it ran to its end


def test_version_into_a_broken_pipe_is_a_one_line_error():
    out = _run_into_a_broken_pipe("version")
    assert "cannot write the output: its pipe's reader has gone" in one_line_error(out)
