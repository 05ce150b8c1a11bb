#include "lib.h"

#define UART 0x3f8
#define FW_CFG_SELECTOR 0x510
#define FW_CFG_DATA 0x511

void putc(char c)
{
	while (!(inb(UART + 5) & 0x20))
		;
	outb(UART, (uint8_t)c);
}

void puts(const char *s)
{
	while (*s)
		putc(*s++);
}

void put_hex(uint32_t v)
{
	int i;

	puts("0x");
	for (i = 28; i >= 0; i -= 4)
		putc("0123456789abcdef"[(v >> i) & 0xf]);
}

void put_dec(uint32_t v)
{
	char buf[12];
	int i = 0;

	do {
		buf[i++] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	while (i)
		putc(buf[--i]);
}

void print(const char *label, uint32_t v)
{
	puts(label);
	putc('=');
	put_dec(v);
	putc('\n');
}

size_t strlen(const char *s)
{
	size_t n = 0;

	while (s[n])
		n++;
	return n;
}

int strcmp(const char *a, const char *b)
{
	while (*a && *a == *b)
		a++, b++;
	return (unsigned char)*a - (unsigned char)*b;
}

int memcmp(const void *a, const void *b, size_t n)
{
	const unsigned char *x = a, *y = b;

	for (; n; n--, x++, y++)
		if (*x != *y)
			return *x - *y;
	return 0;
}

void *memcpy(void *d, const void *s, size_t n)
{
	unsigned char *dd = d;
	const unsigned char *ss = s;

	while (n--)
		*dd++ = *ss++;
	return d;
}

void *memset(void *d, int c, size_t n)
{
	unsigned char *dd = d;

	while (n--)
		*dd++ = (unsigned char)c;
	return d;
}

void debug_exit(uint32_t code)
{
	outl(0xf4, code);
	for (;;)
		__asm__ volatile("cli; hlt");
}

void check(int ok, const char *msg)
{
	if (ok)
		return;
	puts("FAIL: ");
	puts(msg);
	putc('\n');
	debug_exit(1);
}

void pass(void)
{
	puts("PASS\n");
	debug_exit(0);
}

void fw_cfg_read(uint16_t key, void *buf, uint32_t len)
{
	uint8_t *p = buf;

	outw(FW_CFG_SELECTOR, key);
	while (len--)
		*p++ = inb(FW_CFG_DATA);
}

static uint32_t be32(const uint8_t *p)
{
	return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

uint16_t fw_cfg_find(const char *name, uint32_t *size)
{
	uint8_t raw[4], entry[64];
	uint32_t count, i;

	outw(FW_CFG_SELECTOR, 0x19);
	for (i = 0; i < 4; i++)
		raw[i] = inb(FW_CFG_DATA);
	count = be32(raw);
	for (i = 0; i < count; i++) {
		uint32_t j;

		for (j = 0; j < 64; j++)
			entry[j] = inb(FW_CFG_DATA);
		if (!strcmp((const char *)entry + 8, name)) {
			*size = be32(entry);
			return (uint16_t)(entry[4] << 8 | entry[5]);
		}
	}
	return 0;
}

uint8_t sum_bytes(const void *p, uint32_t len)
{
	const uint8_t *b = p;
	uint8_t s = 0;

	while (len--)
		s += *b++;
	return s;
}

const uint8_t *acpi_find_rsdp(void)
{
	uintptr_t a;

	for (a = 0xE0000; a < 0x100000; a += 16) {
		const uint8_t *p = (const uint8_t *)a;

		if (!memcmp(p, "RSD PTR ", 8) && sum_bytes(p, 20) == 0)
			return p;
	}
	return NULL;
}

const struct acpi_header *acpi_find(const char *sig)
{
	const uint8_t *rsdp = acpi_find_rsdp();
	const struct acpi_header *rsdt;
	uint32_t i, n;

	if (!rsdp)
		return NULL;
	rsdt = (const struct acpi_header *)(uintptr_t)*(const uint32_t *)(rsdp + 16);
	check(!memcmp(rsdt->signature, "RSDT", 4), "RSDP does not point at an RSDT");
	check(sum_bytes(rsdt, rsdt->length) == 0, "RSDT checksum");
	n = (rsdt->length - sizeof(*rsdt)) / 4;
	for (i = 0; i < n; i++) {
		const uint32_t *entries = (const uint32_t *)(rsdt + 1);
		const struct acpi_header *t = (const struct acpi_header *)(uintptr_t)entries[i];

		check(sum_bytes(t, t->length) == 0, "a table's checksum");
		if (!memcmp(t->signature, sig, 4))
			return t;
	}
	return NULL;
}

/* Kernels without SMP never start APs; smp.c defines the real one. */
__attribute__((weak)) void ap_main(void)
{
}
