/*
 * The guest of tests/test_sandbox.py: plain functions pyvt.Sandbox calls by
 * name, functions that call back into Python, and ones that misbehave.
 * Built by the tests with pyvt.sandbox.build_guest (-mgeneral-regs-only:
 * ring-0 code is emulated on PVM hosts, without SSE).
 */
#include "pyvt_guest.h"

static unsigned int crc_table[256];
static unsigned long init_calls;
long counter;

/* Runs once, before the snapshot: the table is there in every call. */
void pyvt_init(void)
{
	for (unsigned int i = 0; i < 256; i++) {
		unsigned int c = i;

		for (int k = 0; k < 8; k++)
			c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
		crc_table[i] = c;
	}
	init_calls++;
	pyvt_host_call("ready", init_calls);
}

unsigned int crc32(const unsigned char *p, unsigned long n)
{
	unsigned int c = ~0u;

	while (n--)
		c = crc_table[(c ^ *p++) & 0xff] ^ (c >> 8);
	return ~c;
}

/* Each register weighs differently, so a swap shows. */
unsigned long weigh6(unsigned long a, unsigned long b, unsigned long c,
		     unsigned long d, unsigned long e, unsigned long f)
{
	return a + 10 * b + 100 * c + 1000 * d + 10000 * e + 100000 * f;
}

long negate(long x)
{
	return -x;
}

void empty(void)
{
}

/* Where each of two buffers starts, and whether they overlap. */
unsigned long distance(const char *a, const char *b)
{
	return (unsigned long)(b - a);
}

unsigned long address_of(const void *p)
{
	return (unsigned long)p;
}

void fill(unsigned char *p, unsigned long n, unsigned char first)
{
	for (unsigned long i = 0; i < n; i++)
		p[i] = (unsigned char)(first + i);
}

long bump(void)
{
	return ++counter;
}

unsigned long init_count(void)
{
	return init_calls;
}

long greet(const char *who)
{
	return (long)pyvt_host_call("log", who) + 1;
}

long host_add(long a, long b)
{
	return (long)pyvt_host_call("add", a, b);
}

long host_digest(const unsigned char *p, unsigned long n)
{
	return (long)pyvt_host_call("digest", p, n);
}

long call_unregistered(void)
{
	return (long)pyvt_host_call("nobody_registered_this");
}

long deref(const long *p)
{
	return *p;
}

long divide(long a, long b)
{
	return a / b;
}

void spin(void)
{
	for (;;)
		__asm__ volatile("");
}

void halt(void)
{
	__asm__ volatile("hlt");
}
