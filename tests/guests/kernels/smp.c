/*
 * Brings up every AP the MADT lists with INIT/SIPI/SIPI; each AP checks in
 * (its APIC ID in a mask) and increments a shared counter.  With "ap-exit"
 * on the command line, the last AP leaves through debug-exit (code 5) while
 * the BSP spins: the VMM must stop every vCPU.
 */
#include "lib.h"

#define LAPIC 0xFEE00000u
#define LAPIC_ID 0x20
#define LAPIC_SVR 0xF0
#define LAPIC_ICR_LOW 0x300
#define LAPIC_ICR_HIGH 0x310
#define ICR_INIT 0x00000500
#define ICR_STARTUP 0x00000600
#define ICR_LEVEL_ASSERT 0x00004000
#define ICR_ALL_BUT_SELF 0x000C0000
#define ICR_PENDING 0x00001000
#define TRAMPOLINE 0x8000
#define PM_TIMER 0x608

extern char trampoline_start[], trampoline_end[];
static volatile uint32_t checked_in;
static volatile uint32_t expected_aps;
static int ap_exit;
static volatile uint32_t apic_mask;

static uint32_t lapic_read(uint32_t reg)
{
	return *(volatile uint32_t *)(LAPIC + reg);
}

static void lapic_write(uint32_t reg, uint32_t v)
{
	*(volatile uint32_t *)(LAPIC + reg) = v;
}

static void send_ipi(uint32_t icr)
{
	lapic_write(LAPIC_ICR_HIGH, 0);
	lapic_write(LAPIC_ICR_LOW, icr);
	while (lapic_read(LAPIC_ICR_LOW) & ICR_PENDING)
		;
}

/* Waits about us microseconds on the PM timer. */
static void delay_us(uint32_t us)
{
	uint32_t start = inl(PM_TIMER), ticks = us * 3579545ull / 1000000;

	while (inl(PM_TIMER) - start < ticks)
		;
}

void ap_main(void)
{
	uint32_t id = lapic_read(LAPIC_ID) >> 24;

	__atomic_or_fetch(&apic_mask, 1u << id, __ATOMIC_SEQ_CST);
	if (__atomic_add_fetch(&checked_in, 1, __ATOMIC_SEQ_CST) == expected_aps &&
	    ap_exit) {
		puts("ap exits\n");
		debug_exit(5);
	}
}

static int contains(const char *haystack, const char *needle)
{
	size_t n = strlen(needle);

	for (; *haystack; haystack++)
		if (!memcmp(haystack, needle, n))
			return 1;
	return 0;
}

void kmain(uint32_t magic, const uint32_t *info)
{
	const struct acpi_header *madt;
	uint32_t cpus = 0, offset, waited;

	check(magic == 0x2BADB002, "EAX is not the multiboot magic");
	ap_exit = (info[0] & 4) && contains((const char *)info[4], "ap-exit");
	madt = acpi_find("APIC");
	check(madt != NULL, "no MADT");
	for (offset = sizeof(*madt) + 8; offset < madt->length;) {
		const uint8_t *e = (const uint8_t *)madt + offset;

		if (e[0] == 0 && (*(const uint32_t *)(e + 4) & 1))
			cpus++;
		offset += e[1];
	}
	print("cpus", cpus);
	expected_aps = cpus - 1;
	print("bsp_apic_id", lapic_read(LAPIC_ID) >> 24);
	apic_mask = 1u << (lapic_read(LAPIC_ID) >> 24);

	memcpy((void *)TRAMPOLINE, trampoline_start, trampoline_end - trampoline_start);
	lapic_write(LAPIC_SVR, lapic_read(LAPIC_SVR) | 0x100); /* software enable */
	send_ipi(ICR_ALL_BUT_SELF | ICR_INIT | ICR_LEVEL_ASSERT);
	delay_us(10000);
	send_ipi(ICR_ALL_BUT_SELF | ICR_STARTUP | (TRAMPOLINE >> 12));
	delay_us(200);
	send_ipi(ICR_ALL_BUT_SELF | ICR_STARTUP | (TRAMPOLINE >> 12));

	for (waited = 0; checked_in < cpus - 1 && waited < 2000; waited++)
		delay_us(1000);
	while (ap_exit) /* the AP ends the run; the VMM must stop this vCPU */
		__asm__ volatile("pause");
	print("checked_in", checked_in);
	puts("apic_mask=");
	put_hex(apic_mask);
	putc('\n');
	check(checked_in == cpus - 1, "not every AP checked in");
	pass();
}
