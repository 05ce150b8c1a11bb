/*
 * The guest of tests/test_sandbox_native.py: functions that change the
 * state a ring-3 call can change (x87/SSE registers, MXCSR, memory) and functions that read it back, so that the tests
 * see what the next call starts from.  Built with -mgeneral-regs-only: the
 * compiler itself leaves the vector registers alone; only the inline
 * assembly below touches them.
 */
#include "pyvt_guest.h"

long counter;

/* Leaves XMM0 = value, MXCSR rounding toward zero, one value on the x87 stack. */
void dirty_vector_state(unsigned long value)
{
	unsigned int mxcsr = 0x7F80;

	__asm__ volatile("movq %0, %%xmm0" : : "r"(value));
	__asm__ volatile("ldmxcsr %0" : : "m"(mxcsr));
	__asm__ volatile("fld1");
}

unsigned long xmm0_low(void)
{
	unsigned long value;

	__asm__ volatile("movq %%xmm0, %0" : "=r"(value));
	return value;
}

unsigned long mxcsr(void)
{
	unsigned int value;

	__asm__ volatile("stmxcsr %0" : "=m"(value));
	return value;
}

/* The x87 status word: TOP (bits 11-13) counts the values pushed. */
unsigned long x87_status(void)
{
	unsigned short value;

	__asm__ volatile("fnstsw %0" : "=m"(value));
	return value;
}

/* Writes `value` at `address`: pyvt's reserved area is writable from ring 3. */
void poke(unsigned long address, unsigned long value)
{
	*(volatile unsigned long *)address = value;
}

unsigned long peek(unsigned long address)
{
	return *(volatile unsigned long *)address;
}

long bump(void)
{
	return ++counter;
}

unsigned long counter_address(void)
{
	return (unsigned long)&counter;
}

/*
 * Take an argument they never touch (its page stays out of KVM's dirty
 * log: only pyvt knows it wrote it), then fault (#PF: nothing is mapped at
 * 8 GiB) or call the host's "seen" (the call goes through Python).
 */
unsigned long fault_untouched(const unsigned char *p)
{
	(void)p;
	return *(volatile unsigned long *)0x200000000ul;
}

long tell_host_untouched(const unsigned char *p, unsigned long n)
{
	(void)p;
	return pyvt_host_call("seen", 0xAA, n);
}
