/*
 * Resets the machine the ACPI way: the FADT's reset register (RESET_REG_SUP
 * set), written with its reset value.  The VMM must stop with a reset.
 */
#include "lib.h"

void kmain(uint32_t magic, const void *info)
{
	const uint8_t *fadt;
	uint32_t flags;
	uint64_t address;

	(void)info;
	check(magic == 0x2BADB002, "EAX is not the multiboot magic");
	fadt = (const uint8_t *)acpi_find("FACP");
	check(fadt != NULL, "no FADT");
	flags = *(const uint32_t *)(fadt + 112);
	check(flags & (1 << 10), "FADT says there is no reset register");
	check(fadt[116] == 1, "the reset register is not in I/O space");
	address = *(const uint64_t *)(fadt + 120);
	puts("resetting\n");
	outb((uint16_t)address, fadt[128]);
	puts("FAIL: still running after the reset\n");
	debug_exit(1);
}
