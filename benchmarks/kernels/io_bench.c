/*
 * A multiboot kernel that times two kinds of port I/O with the TSC (131072
 * of each):
 * printing through the 16550 UART (LSR polled before each byte, as drivers
 * do) and reading the ACPI PM timer (its port from the FADT).  Each read or
 * write of a device register is an exit to the VMM, so cycles per operation
 * compare VMMs.  Built with tests/guests/kernels/ (lib.c, entry.S).
 */
#include "lib.h"

/* Powers of two: the 32-bit kernel has no 64-bit division (no libgcc). */
#define SHIFT 17
#define CHARS (1u << SHIFT)
#define READS (1u << SHIFT)

static inline uint64_t rdtsc(void)
{
	uint32_t lo, hi;

	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((uint64_t)hi << 32) | lo;
}

static uint16_t pm_timer_port(void)
{
	const struct acpi_header *fadt = acpi_find("FACP");

	check(fadt != 0, "no FADT");
	return (uint16_t)*(const uint32_t *)((const uint8_t *)fadt + 76); /* PM_TMR_BLK */
}

void kmain(uint32_t magic, const void *info)
{
	uint16_t pm = pm_timer_port();
	uint64_t start, uart, timer;
	uint32_t i, sink = 0;

	(void)magic;
	(void)info;
	start = rdtsc();
	for (i = 0; i < CHARS; i++) {
		while (!(inb(0x3fd) & 0x20))
			;
		outb(0x3f8, (i % 64 == 63) ? '\n' : 'x');
	}
	uart = rdtsc() - start;
	start = rdtsc();
	for (i = 0; i < READS; i++)
		sink += inl(pm);
	timer = rdtsc() - start;
	print("\nuart_cycles_per_char", (uint32_t)(uart >> SHIFT));
	print("pm_cycles_per_read", (uint32_t)(timer >> SHIFT));
	print("sink", sink & 1);
	debug_exit(0);
}
