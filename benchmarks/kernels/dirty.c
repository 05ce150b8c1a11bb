/* For benchmarks/migration.py under QEMU: touches every page of RAM above
 * 4 MiB once (so that a migration carries the whole guest, as the pyvt
 * guest's), then writes one page after another forever, waiting
 * DIRTY_DELAY loop rounds after each: the dirty rate. */
#include "lib.h"

#ifndef DIRTY_DELAY
#define DIRTY_DELAY 20
#endif

void kmain(uint32_t magic, const void *info)
{
	(void)magic;
	uint32_t mem_upper_kb = ((const uint32_t *)info)[2];
	uint32_t start = 4u << 20, end = 0x100000u + mem_upper_kb * 1024u;
	puts("touching\n");
	for (uint32_t a = start; a < end; a += 4096)
		*(volatile uint32_t *)a = a ^ 0x5a5a5a5au;
	puts("dirtying\n");
	for (uint32_t round = 1;; round++) {
		for (uint32_t a = start; a < end; a += 4096) {
			*(volatile uint32_t *)a = round;
			for (volatile uint32_t d = 0; d < DIRTY_DELAY; d++)
				;
		}
	}
}
