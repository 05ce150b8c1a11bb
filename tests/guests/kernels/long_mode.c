/* Runs in 64-bit mode after entry64.S: checks it is there and what it got. */
#include "lib.h"

struct mb_info {
	uint32_t flags, mem_lower, mem_upper, boot_device, cmdline;
} __attribute__((packed));

static uint64_t rdmsr(uint32_t msr)
{
	uint32_t lo, hi;

	__asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
	return (uint64_t)hi << 32 | lo;
}

void kmain(uint64_t magic, uint64_t info_address)
{
	const struct mb_info *info = (const struct mb_info *)info_address;
	char signature[5] = { 0 };
	uint64_t big = 1;

	check(magic == 0x2BADB002, "EDI is not the multiboot magic");
	check(sizeof(void *) == 8, "not a 64-bit build");
	check(rdmsr(0xC0000080) & (1 << 10), "EFER.LMA is clear: not in long mode");
	puts("mode=long\n");
	big <<= 40;
	print("shifted_gib", (uint32_t)(big >> 30));
	puts("cmdline=");
	puts((const char *)(uint64_t)info->cmdline);
	putc('\n');
	fw_cfg_read(0x0000, signature, 4);
	puts("fw_cfg=");
	puts(signature);
	putc('\n');
	check(acpi_find("APIC") != NULL, "no MADT");
	pass();
}
