"""``pyvt boot`` with a Linux bzImage and the device options
(``--disk FILE[,readonly]``, ``--net tap:NAME``, ``--rng``, ``--console``): a hand-made
bzImage talks over the serial console both ways, and bad options, missing
files and missing taps are one-line errors with status 2."""

import os

import pytest
from test_bzimage import make_bzimage
from test_cli import one_line_error, pyvt_cli

import pyvt
from pyvt import boot_devices, cli, exits

KERNEL_AT = 0x1000000

# The 64-bit entry: prints the command line (from the zero page) on COM1,
# then echoes one line of input as "echo:<LINE IN CAPITALS>", and resets
# the machine through the i8042 (status 0, as qemu -no-reboot).
CONSOLE_GUEST = r"""
.code64
_start:
    mov 0x228(%rsi), %esi
1:  lodsb
    test %al, %al
    jz 2f
    call putc
    jmp 1b
2:  mov $'\n', %al
    call putc
    lea prefix(%rip), %rsi
3:  lodsb
    test %al, %al
    jz 4f
    call putc
    jmp 3b
4:  mov $0x3fd, %dx
5:  in %dx, %al
    test $1, %al
    jz 5b
    mov $0x3f8, %dx
    in %dx, %al
    cmp $'\n', %al
    je 7f
    cmp $'a', %al
    jb 6f
    cmp $'z', %al
    ja 6f
    sub $0x20, %al
6:  call putc
    jmp 4b
7:  call putc
    mov $0xfe, %al
    out %al, $0x64
    hlt
putc:
    mov $0x3f8, %dx
    out %al, %dx
    ret
prefix: .asciz "echo:"
"""


@pytest.fixture(scope="module")
def console_kernel(tmp_path_factory):
    code = pyvt.assemble(CONSOLE_GUEST, at=KERNEL_AT + 0x200, bits=64)
    path = tmp_path_factory.mktemp("bzimage") / "bzImage"
    path.write_bytes(make_bzimage(b"\x0f\x0b" * 0x100 + code))
    return path


@pytest.mark.requires_kvm
def test_boot_bzimage_console_both_ways(console_kernel):
    out = pyvt_cli("boot", console_kernel, "--memory", "64M", "--append", "console=ttyS0 x=1",
                   "--timeout", "60", input="hello pyvt\n")
    assert out.returncode == 0, (out.stdout, out.stderr)
    assert out.stdout.splitlines()[:2] == ["console=ttyS0 x=1", "echo:HELLO PYVT"]
    assert "Reset(source='i8042'" in out.stderr


@pytest.mark.parametrize("args, message", [
    (["--disk", "missing.img"], "disk image missing.img: no such file"),
    (["--disk", "{tmp}"], "is a directory"),
    (["--disk", "{img},bogus"], "unknown disk option 'bogus'"),
    (["--disk", ",readonly"], "no disk image file"),
    (["--net", "tap:"], "names no tap device"),
    (["--net", "user"], "unknown network backend 'user'"),
    (["--net", "tap:pyvt-no-such0"], "no network interface pyvt-no-such0"),
    (["--net", "tap:lo"], "lo is not a tap device"),
])
def test_device_option_errors(tmp_path, console_kernel, args, message):
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(4096))
    args = [a.format(tmp=tmp_path, img=img) for a in args]
    line = one_line_error(pyvt_cli("boot", console_kernel, *args, "--timeout", "10"))
    assert message in line


def test_device_options_parse():
    parser = cli._parser()
    args = parser.parse_args(["boot", "k", "--disk", "a.img", "--disk", "b.img,readonly",
                              "--net", "tap:tap0", "--net", "tap:t1", "--rng"])
    assert args.disk == [boot_devices.DiskOption("a.img", False),
                         boot_devices.DiskOption("b.img", True)]
    assert (args.net, args.rng) == (["tap0", "t1"], True)
    plain = parser.parse_args(["boot", "k"])
    assert (plain.disk, plain.net, plain.rng) == ([], [], False)


def test_bad_bzimage_is_a_one_line_error(tmp_path):
    old = tmp_path / "old-bzImage"
    old.write_bytes(make_bzimage(b"\x90" * 512, version=0x0204))
    line = one_line_error(pyvt_cli("boot", old))
    assert "boot protocol 2.04; pyvt boots 2.10 and later" in line
    line = one_line_error(pyvt_cli("boot", tmp_path / "nothing"))
    assert "nothing" in line


@pytest.mark.skipif(not hasattr(exits, "PowerOff"), reason="no exits.PowerOff in this pyvt")
def test_power_off_is_status_0():
    assert cli.exit_status(exits.PowerOff.__new__(exits.PowerOff)) == 0


def test_console_option_parse():
    parser = cli._parser()
    assert parser.parse_args(["boot", "k"]).console == "serial"
    assert parser.parse_args(["boot", "k", "--console", "virtio"]).console == "virtio"
    assert parser.parse_args(["boot", "k", "--console", "serial"]).console == "serial"
    help_text = " ".join(pyvt_cli("boot", "--help").stdout.split())
    assert "--console {serial,virtio}" in help_text and "console=hvc0" in help_text


def test_bad_console_is_status_2():
    out = pyvt_cli("boot", "k", "--console", "hvc0")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "invalid choice: 'hvc0'" in out.stderr and "virtio" in out.stderr
    with pytest.raises(pyvt.ArgumentError, match="unknown console 'tty'"):
        boot_devices.attach(None, [], [], False, "tty")


@pytest.mark.requires_kvm
def test_virtio_console_is_the_hosts_input(monkeypatch, tmp_path):
    """--console virtio: a virtio console, added after the other devices,
    reads the host's stdin (or /dev/null with --no-stdin)."""
    from pyvt.virtio import ConsoleDevice, RngDevice

    stdin = open(tmp_path / "input", "w+b")
    monkeypatch.setattr("sys.stdin", stdin)
    with pyvt.Vm("64M") as vm:
        boot_devices.attach(vm, [], [], True, "virtio")
        rng, console = (t.device for t in vm.virtio_devices)
        assert isinstance(rng, RngDevice) and isinstance(console, ConsoleDevice)
        assert os.path.samestat(os.fstat(console.in_fd), os.fstat(stdin.fileno()))
    with pyvt.Vm("64M") as vm:
        boot_devices.attach(vm, [], [], False, "virtio", stdin=False)
        (console,) = (t.device for t in vm.virtio_devices)
        assert os.fstat(console.in_fd).st_rdev == os.stat(os.devnull).st_rdev
    with pyvt.Vm("64M") as vm:
        boot_devices.attach(vm, [], [], False, "serial")
        assert vm.virtio_devices == []


@pytest.mark.requires_kvm
def test_boot_console_virtio_keeps_the_uart_output(console_kernel):
    """With --console virtio the UART still prints to stdout but no longer
    gets the terminal's input: the guest, waiting for a line on COM1, runs
    into the timeout (124)."""
    out = pyvt_cli("boot", console_kernel, "--memory", "64M", "--append", "console=hvc0",
                   "--console", "virtio", "--timeout", "3", input="hello pyvt\n")
    assert out.returncode == 124, (out.stdout, out.stderr)
    assert out.stdout.splitlines()[:1] == ["console=hvc0"]
    assert "echo:" in out.stdout and "HELLO" not in out.stdout
