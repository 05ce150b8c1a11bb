/* Checks what a multiboot loader handed over and prints it. */
#include "lib.h"

struct mb_info {
	uint32_t flags, mem_lower, mem_upper, boot_device, cmdline;
	uint32_t mods_count, mods_addr, syms[4], mmap_length, mmap_addr;
	uint32_t drives_length, drives_addr, config_table, boot_loader_name;
} __attribute__((packed));

struct mb_module {
	uint32_t start, end, string, reserved;
} __attribute__((packed));

struct mb_mmap {
	uint32_t size;
	uint64_t base, length;
	uint32_t type;
} __attribute__((packed));

extern char __load_start[], _end[];

static int overlaps(uint32_t a, uint32_t a_end, uint32_t b, uint32_t b_end)
{
	return a < b_end && b < a_end;
}

void kmain(uint32_t magic, const struct mb_info *info)
{
	uint32_t kernel = (uint32_t)__load_start, kernel_end = (uint32_t)_end;
	uint32_t i, covered = 0, offset;
	uint64_t previous_end = 0;

	check(magic == 0x2BADB002, "EAX is not the multiboot magic");
	check((info->flags & 0x24d) == 0x24d,
	      "info flags lack memory, cmdline, mods, mmap or loader name");
	check(!overlaps((uint32_t)info, (uint32_t)info + 88, kernel, kernel_end),
	      "the info structure overlaps the kernel");
	print("mem_lower", info->mem_lower);
	print("mem_upper", info->mem_upper);
	puts("loader=");
	puts((const char *)info->boot_loader_name);
	puts("\ncmdline=");
	puts((const char *)info->cmdline);
	putc('\n');

	for (offset = 0; offset < info->mmap_length;) {
		const struct mb_mmap *e = (const struct mb_mmap *)(info->mmap_addr + offset);

		check(e->size == 20, "mmap entry size is not 20");
		check(e->base >= previous_end, "mmap entries overlap or are unsorted");
		puts("mmap ");
		put_hex((uint32_t)e->base);
		putc(' ');
		put_hex((uint32_t)e->length);
		putc(' ');
		put_dec(e->type);
		putc('\n');
		if (e->type == 1 && e->base <= kernel && kernel_end <= e->base + e->length)
			covered = 1;
		previous_end = e->base + e->length;
		offset += e->size + 4;
	}
	check(covered, "no available mmap entry holds the kernel");
	check(info->mem_upper == ((uint32_t)previous_end - 0x100000) >> 10,
	      "mem_upper disagrees with the memory map");

	print("mods", info->mods_count);
	for (i = 0; i < info->mods_count; i++) {
		const struct mb_module *m = (const struct mb_module *)info->mods_addr + i;
		const uint8_t *p = (const uint8_t *)m->start;
		uint32_t sum = 0, j;

		check((m->start & 0xfff) == 0, "module not page-aligned");
		check(m->end >= m->start, "module ends before it starts");
		check(!overlaps(m->start, m->end, kernel, kernel_end), "module overlaps the kernel");
		check(!overlaps(m->start, m->end, (uint32_t)info, (uint32_t)info + 88),
		      "module overlaps the info structure");
		for (j = 0; j < m->end - m->start; j++)
			sum = sum * 31 + p[j];
		puts("mod ");
		put_dec(i);
		puts(" size=");
		put_dec(m->end - m->start);
		puts(" hash=");
		put_hex(sum);
		puts(" string=");
		puts((const char *)m->string);
		puts(" head=");
		for (j = 0; j < 8 && j < m->end - m->start; j++)
			putc((char)p[j]);
		putc('\n');
	}
	pass();
}
