/* SPDX-License-Identifier: MIT */
/*
 * pyvt_guest.h: what a freestanding guest of pyvt.Sandbox may use.
 *
 * Plain functions need nothing from here: pyvt.Sandbox calls any global
 * function of a static, non-PIE x86-64 ELF by name (SysV ABI, up to six
 * integer or pointer arguments, the result in rax).  This header adds:
 *
 *   - pyvt_host_call(name, args...): calls the Python function registered
 *     with sb.host_function(name, fn) (or Sandbox(host_functions=...)) with
 *     up to six integer or pointer arguments (a char * arrives as a str),
 *     and returns what it returns;
 *   - pyvt_init(): define it, and pyvt calls it once after loading, before
 *     the snapshot that every call starts from (tables, allocators...).
 *
 * Build a guest (C11) with pyvt.sandbox.build_guest(), or by hand:
 *   cc -ffreestanding -nostdlib -static -fno-pie -no-pie -O2 \
 *      -I"$(python3 -c 'import pyvt; print(pyvt.get_include())')" \
 *      -Wl,-e,0 -o guest.elf guest.c
 * (-Wl,-e,0: a guest has no _start, pyvt enters it by symbol.)
 */
#ifndef PYVT_GUEST_H
#define PYVT_GUEST_H

/*
 * A host call is a write to this port (pyvt.sandbox reads these lines, so
 * each value has one source), with rax pointing at a struct pyvt_host_call
 * and the arguments in rdi, rsi, rdx, rcx, r8, r9 (the SysV order, rcx for
 * the fourth).  The host writes the result into the struct: writing guest
 * memory, unlike a register, lets the vCPU go on without another entry.
 */
#define PYVT_HOST_CALL_PORT 0xf0
#define PYVT_STRING_ARGUMENTS_SHIFT 3

struct pyvt_host_call {
	const char *name;
	/* The argument count in bits 0-2, then (from PYVT_STRING_ARGUMENTS_SHIFT)
	 * one bit per argument that is a char *: the host reads it as a string. */
	unsigned long described;
	unsigned long result;	/* written by the host */
};

void pyvt_init(void);

static inline unsigned long pyvt_host_call6(const char *name, unsigned long described,
					    unsigned long a0, unsigned long a1,
					    unsigned long a2, unsigned long a3,
					    unsigned long a4, unsigned long a5)
{
	struct pyvt_host_call call = { name, described, 0 };
	register unsigned long r8 __asm__("r8") = a4;
	register unsigned long r9 __asm__("r9") = a5;

	/* "memory": the host reads what the arguments point to, and writes. */
	__asm__ volatile("outb %%al, %[port]"
			 :
			 : "a"(&call), "D"(a0), "S"(a1), "d"(a2), "c"(a3), "r"(r8),
			   "r"(r9), [port] "i"(PYVT_HOST_CALL_PORT)
			 : "memory");
	return call.result;
}

#define PYVT__U(x) ((unsigned long)(x))
/* 1 for a C string (char *, a string literal), else 0; at argument i's bit. */
#define PYVT__S(x, i) \
	((unsigned long)_Generic((x), char *: 1, const char *: 1, default: 0) \
	 << (PYVT_STRING_ARGUMENTS_SHIFT + (i)))
#define PYVT__CALL0(n) pyvt_host_call6(n, 0, 0, 0, 0, 0, 0, 0)
#define PYVT__CALL1(n, a) \
	pyvt_host_call6(n, 1 | PYVT__S(a, 0), PYVT__U(a), 0, 0, 0, 0, 0)
#define PYVT__CALL2(n, a, b) \
	pyvt_host_call6(n, 2 | PYVT__S(a, 0) | PYVT__S(b, 1), PYVT__U(a), PYVT__U(b), \
			0, 0, 0, 0)
#define PYVT__CALL3(n, a, b, c) \
	pyvt_host_call6(n, 3 | PYVT__S(a, 0) | PYVT__S(b, 1) | PYVT__S(c, 2), \
			PYVT__U(a), PYVT__U(b), PYVT__U(c), 0, 0, 0)
#define PYVT__CALL4(n, a, b, c, d) \
	pyvt_host_call6(n, 4 | PYVT__S(a, 0) | PYVT__S(b, 1) | PYVT__S(c, 2) | \
			PYVT__S(d, 3), PYVT__U(a), PYVT__U(b), PYVT__U(c), PYVT__U(d), 0, 0)
#define PYVT__CALL5(n, a, b, c, d, e) \
	pyvt_host_call6(n, 5 | PYVT__S(a, 0) | PYVT__S(b, 1) | PYVT__S(c, 2) | \
			PYVT__S(d, 3) | PYVT__S(e, 4), PYVT__U(a), PYVT__U(b), \
			PYVT__U(c), PYVT__U(d), PYVT__U(e), 0)
#define PYVT__CALL6(n, a, b, c, d, e, f) \
	pyvt_host_call6(n, 6 | PYVT__S(a, 0) | PYVT__S(b, 1) | PYVT__S(c, 2) | \
			PYVT__S(d, 3) | PYVT__S(e, 4) | PYVT__S(f, 5), PYVT__U(a), \
			PYVT__U(b), PYVT__U(c), PYVT__U(d), PYVT__U(e), PYVT__U(f))
#define PYVT__PICK(_1, _2, _3, _4, _5, _6, _7, _8, NAME, ...) NAME

/*
 * pyvt_host_call("log", message) -> unsigned long.  Arguments are integers
 * or pointers; a char * reaches Python as a str, anything else as an int
 * (unless sb.host_function(..., args=...) says otherwise).  More than six
 * arguments do not compile (pyvt_host_call_takes_at_most_6_arguments is
 * undefined): the host reads only the six argument registers.
 */
#define pyvt_host_call(...)                                                        \
	PYVT__PICK(__VA_ARGS__, pyvt_host_call_takes_at_most_6_arguments, PYVT__CALL6, \
		   PYVT__CALL5, PYVT__CALL4, PYVT__CALL3, PYVT__CALL2, PYVT__CALL1,    \
		   PYVT__CALL0, )(__VA_ARGS__)

#endif /* PYVT_GUEST_H */
