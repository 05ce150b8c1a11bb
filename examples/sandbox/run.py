"""Calls a freestanding C guest's functions from Python with pyvt.Sandbox.

    python examples/sandbox/run.py

Builds crc32.c with the system C compiler (pyvt.sandbox.build_guest: cc
-ffreestanding -nostdlib -static -fno-pie..., pyvt_guest.h on the include
path), loads it at ring 3 (natively on software-assisted KVM such as PVM),
and calls its functions by name: bytes go into the guest's argument arena,
the result comes back from rax, the guest calls back into Python, and every
call starts from the snapshot taken after pyvt_init().
"""

import tempfile
import time
import zlib
from pathlib import Path

import pyvt
from pyvt.sandbox import build_guest

HERE = Path(__file__).resolve().parent


def main() -> None:
    with tempfile.TemporaryDirectory() as work:
        elf = build_guest(HERE / "crc32.c", Path(work) / "crc32.elf")
        with pyvt.Sandbox(elf, memory="16M", ring=3,
                          host_functions={"log": print}) as sb:
            data = b"The quick brown fox jumps over the lazy dog"
            crc = sb.call("crc32", data, len(data))
            print(f"crc32({data!r}) = {crc:#010x} (zlib: {zlib.crc32(data):#010x})")

            sb.host_function("progress", lambda done, total: print(f"  {done}/{total}"))
            big = bytes(range(256)) * 1024
            assert sb.call("crc32_with_progress", big, len(big)) == zlib.crc32(big)

            try:
                sb.call("crc32", 1 << 40, 16)  # a pointer past guest memory: #PF
            except pyvt.GuestFault as fault:
                print(f"as expected: {str(fault).splitlines()[0]}")

            calls = 2000
            start = time.perf_counter()
            for _ in range(calls):
                sb.call("ping")
            print(f"{calls / (time.perf_counter() - start):.0f} calls/s of an empty "
                  "function, each from the snapshot")


if __name__ == "__main__":
    main()
