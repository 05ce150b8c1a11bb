"""csrc/virtio_ring.c under AddressSanitizer and UBSan: random rings,
descriptor tables and indirect tables over two small RAM regions
(malloc'ed exactly to size, so that any access past them is reported).
Every chain walk, copy, iovec, used-ring update and suppression check must
stay inside guest RAM."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

HARNESS = r"""
#include "virtio_ring.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <errno.h>
#include <linux/virtio_config.h>
static uint64_t rnd_state = 88172645463325252ULL;
static uint64_t rnd(void) { rnd_state ^= rnd_state << 13; rnd_state ^= rnd_state >> 7; rnd_state ^= rnd_state << 17; return rnd_state; }
int main(int argc, char **argv) {
	int rounds = argc > 1 ? atoi(argv[1]) : 2000;
	size_t ram_size = 1 << 16;
	uint8_t *ram = malloc(ram_size);   /* ASan catches any access past it */
	uint8_t *ram2 = malloc(8192);
	struct pvt_vmem mem = {.count = 2};
	mem.regions[0] = (struct pvt_vmem_region){.gpa = 0, .size = ram_size, .host = ram, .written = calloc(1, 8)};
	mem.regions[1] = (struct pvt_vmem_region){.gpa = 0x100000, .size = 8192, .host = ram2, .written = calloc(1, 8)};
	static struct pvt_vq_elem e;
	struct iovec iov[PVT_VQ_MAX_SEGS];
	long popped = 0, bad = 0, broken = 0;
	for (int round = 0; round < rounds; round++) {
		for (size_t i = 0; i < ram_size; i += 8) *(uint64_t *)(ram + i) = rnd();
		for (size_t i = 0; i < 8192; i += 8) *(uint64_t *)(ram2 + i) = rnd();
		/* descriptor addresses near the regions */
		for (int i = 0; i < 2048; i++) {
			uint64_t *a = (uint64_t *)(ram + 16 * (rnd() % (ram_size / 16)));
			switch (rnd() % 4) { case 0: *a = rnd() % (ram_size + 64); break; case 1: *a = 0x100000 + rnd() % 8300; break; case 2: *a = ram_size - rnd() % 64; break; default: break; }
			uint32_t *l = (uint32_t *)((uint8_t *)a + 8);
			if (rnd() % 2) *l = rnd() % 200;
		}
		struct pvt_vq vq = {0};
		uint32_t size = 1u << (rnd() % 8);
		uint64_t desc = (rnd() % 64) * 16, avail = 0x4000 + (rnd() % 64) * 2, used = 0x8000 + (rnd() % 64) * 4;
		if (rnd() % 8 == 0) used = ram_size - 6 - 8 * size + (rnd() % 3) * 4;
		if (pvt_vq_setup(&vq, &mem, size, desc, avail, used)) continue;
		uint16_t *av = (uint16_t *)(ram + avail);
		av[1] = rnd() % (size + 3);
		for (uint32_t i = 0; i < size; i++) if (rnd() % 16) av[2 + i] = rnd() % (size + 1);
		/* chains mostly within the table */
		for (uint32_t i = 0; i < size; i++) if (rnd() % 4) *(uint16_t *)(ram + desc + 16 * i + 14) = rnd() % (size + 1);
		uint64_t features = (1ULL << VIRTIO_F_VERSION_1) | ((rnd() % 2) << VIRTIO_RING_F_INDIRECT_DESC) | ((rnd() % 2) << VIRTIO_RING_F_EVENT_IDX);
		for (int n = 0; n < 64; n++) {
			int rc = pvt_vq_pop(&vq, &mem, features, &e);
			if (rc == 0) break;
			if (rc == -EIO) { broken++; break; }
			if (rc < 0) { bad++; continue; }
			popped++;
			uint8_t buf[300];
			pvt_vq_read(&e, rnd() % 40, buf, rnd() % 300);
			pvt_vq_write(&e, rnd() % 40, buf, rnd() % 300);
			int k = pvt_vq_iov(&e, rnd() % 2, rnd() % 40, rnd() % 300, iov, PVT_VQ_MAX_SEGS);
			for (int j = 0; j < k; j++) memset(iov[j].iov_base, 1, iov[j].iov_len);
			pvt_vq_complete(&vq, &e, rnd() % 400);
			pvt_vq_should_notify(&vq, features);
			pvt_vq_enable_kicks(&vq, features);
			pvt_vq_disable_kicks(&vq, features);
		}
	}
	printf("%ld %ld %ld\n", popped, bad, broken);
	free(mem.regions[0].written);
	free(mem.regions[1].written);
	free(ram);
	free(ram2);
	return 0;
}
"""


def test_ring_walking_never_leaves_guest_ram(tmp_path):
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    (tmp_path / "fuzz.c").write_text(HARNESS)
    build = subprocess.run(
        [cc, "-g", "-O1", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
         "-fno-sanitize=alignment", f"-I{ROOT / 'csrc'}", str(tmp_path / "fuzz.c"),
         str(ROOT / "csrc" / "virtio_ring.c"), "-o", str(tmp_path / "fuzz")],
        capture_output=True, text=True)
    if build.returncode and "sanitize" in build.stderr:
        pytest.skip(f"the compiler has no sanitizers: {build.stderr.strip()[:200]}")
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(tmp_path / "fuzz"), "3000"], capture_output=True, text=True,
                         timeout=600, env={"ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0"})
    assert run.returncode == 0, run.stderr[-4000:]
    popped, malformed, broken = map(int, run.stdout.split())
    # All three outcomes were exercised.
    assert popped > 100 and malformed > 100 and broken > 100
