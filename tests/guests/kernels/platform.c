/*
 * Walks the PC platform as a kernel would: fw_cfg, the ACPI tables, the PM
 * timer they point at, CPUID and the CMOS memory size.
 */
#include "lib.h"

struct fadt_fields {
	struct acpi_header h;
	uint32_t firmware_ctrl, dsdt;
	uint8_t reserved, profile;
	uint16_t sci;
	uint32_t smi_cmd;
	uint8_t enable, disable, s4bios, pstate;
	uint32_t pm1a_evt, pm1b_evt, pm1a_cnt, pm1b_cnt, pm2_cnt, pm_tmr;
	uint32_t gpe0, gpe1;
	uint8_t pm1_evt_len, pm1_cnt_len, pm2_cnt_len, pm_tmr_len;
	uint8_t gpe0_len, gpe1_len, gpe1_base, cst;
	uint16_t lvl2, lvl3, flush_size, flush_stride;
	uint8_t duty_offset, duty_width, day_alarm, month_alarm, century;
	uint16_t boot_arch;
	uint8_t reserved2;
	uint32_t flags;
	uint8_t reset_space, reset_width, reset_offset, reset_access;
	uint64_t reset_address;
	uint8_t reset_value;
} __attribute__((packed));

static uint8_t cmos(uint8_t index)
{
	outb(0x70, index);
	return inb(0x71);
}

void kmain(uint32_t magic, const void *info)
{
	char signature[5] = { 0 };
	char greeting[64] = { 0 };
	uint16_t cpus = 0, key;
	uint64_t ram = 0;
	uint32_t size = 0, t0, t1, lapics = 0, ioapics = 0, offset, a, b, c, d;
	const uint8_t *rsdp;
	const struct acpi_header *madt, *xsdt;
	const struct fadt_fields *fadt;

	(void)info;
	check(magic == 0x2BADB002, "EAX is not the multiboot magic");

	fw_cfg_read(0x0000, signature, 4);
	fw_cfg_read(0x0005, &cpus, 2);
	fw_cfg_read(0x0003, &ram, 8);
	puts("fw_cfg=");
	puts(signature);
	putc('\n');
	print("fw_cfg_cpus", cpus);
	print("fw_cfg_ram_mib", (uint32_t)(ram >> 20));
	key = fw_cfg_find("opt/pyvt/greeting", &size);
	check(key >= 0x20, "fw_cfg has no opt/pyvt/greeting");
	check(size < sizeof(greeting), "the greeting is too long");
	fw_cfg_read(key, greeting, size);
	puts("greeting=");
	puts(greeting);
	putc('\n');

	rsdp = acpi_find_rsdp();
	check(rsdp != NULL, "no RSDP in 0xE0000-0xFFFFF");
	check(rsdp[15] >= 2 && sum_bytes(rsdp, 36) == 0, "RSDP extended checksum");
	xsdt = (const struct acpi_header *)(uintptr_t)*(const uint64_t *)(rsdp + 24);
	check(!memcmp(xsdt->signature, "XSDT", 4) && sum_bytes(xsdt, xsdt->length) == 0,
	      "XSDT missing or bad checksum");
	fadt = (const struct fadt_fields *)acpi_find("FACP");
	check(fadt != NULL, "no FADT");
	check(sum_bytes((const void *)(uintptr_t)fadt->dsdt,
			((const struct acpi_header *)(uintptr_t)fadt->dsdt)->length) == 0,
	      "DSDT checksum");
	print("pm_tmr_blk", fadt->pm_tmr);
	print("tmr_val_ext", (fadt->flags >> 8) & 1);
	print("reset_reg", (uint32_t)fadt->reset_address);
	print("reset_value", fadt->reset_value);
	print("century", fadt->century);
	madt = acpi_find("APIC");
	check(madt != NULL, "no MADT");
	for (offset = sizeof(*madt) + 8; offset < madt->length;) {
		const uint8_t *e = (const uint8_t *)madt + offset;

		if (e[0] == 0 && (*(const uint32_t *)(e + 4) & 1))
			lapics++;
		if (e[0] == 1) {
			ioapics++;
			print("ioapic_address", *(const uint32_t *)(e + 4));
		}
		offset += e[1];
	}
	print("madt_lapics", lapics);
	print("madt_ioapics", ioapics);
	check(lapics == cpus, "the MADT and fw_cfg disagree on the CPU count");

	t0 = inl((uint16_t)fadt->pm_tmr);
	for (a = 0; a < 2000; a++)
		__asm__ volatile("pause");
	t1 = inl((uint16_t)fadt->pm_tmr);
	check(t1 != t0, "the PM timer does not advance");
	puts("pm_timer=advancing\n");

	cpuid(1, &a, &b, &c, &d);
	print("apic_id", b >> 24);
	print("cpuid_logical", (b >> 16) & 0xff);
	print("cpuid_htt", (d >> 28) & 1);
	cpuid(0, &a, &b, &c, &d);
	if (a >= 0xb) {
		__asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(0xb), "c"(1));
		print("x2apic_cores", b & 0xffff);
	} else {
		print("x2apic_cores", cpus);
	}
	print("cmos_ext_kib", cmos(0x30) | cmos(0x31) << 8);

	/* Nothing claims these: a PC answers all ones (no PCI device, no HPET). */
	outl(0xcf8, 0x80000000);
	puts("pci_00_0=");
	put_hex(inl(0xcfc));
	puts("\nunbacked_mmio=");
	put_hex(*(volatile uint32_t *)0xFED00000u);
	putc('\n');
	pass();
}
