/* SPDX-License-Identifier: GPL-2.0 */
/*
 * For the world-switch assembly: where each guest GPR lives in
 * struct pyvt_vcpu's unsigned long gprs[16] (x86 register-number order),
 * and macros moving all but RAX and RSP, which each vendor handles
 * itself, between that array (base register \base) and the CPU.
 */
#ifndef PYVT_GUEST_GPRS_H
#define PYVT_GUEST_GPRS_H

#define VCPU_RAX	(0 * 8)
#define VCPU_RCX	(1 * 8)
#define VCPU_RDX	(2 * 8)
#define VCPU_RBX	(3 * 8)
#define VCPU_RBP	(5 * 8)
#define VCPU_RSI	(6 * 8)
#define VCPU_RDI	(7 * 8)
#define VCPU_R8		(8 * 8)
#define VCPU_R9		(9 * 8)
#define VCPU_R10	(10 * 8)
#define VCPU_R11	(11 * 8)
#define VCPU_R12	(12 * 8)
#define VCPU_R13	(13 * 8)
#define VCPU_R14	(14 * 8)
#define VCPU_R15	(15 * 8)

/* MOVs only: the flags survive, so a test before the load still holds. */
.macro LOAD_GUEST_GPRS base
	mov	VCPU_RCX(\base), %rcx
	mov	VCPU_RDX(\base), %rdx
	mov	VCPU_RBX(\base), %rbx
	mov	VCPU_RBP(\base), %rbp
	mov	VCPU_RSI(\base), %rsi
	mov	VCPU_RDI(\base), %rdi
	mov	VCPU_R8(\base), %r8
	mov	VCPU_R9(\base), %r9
	mov	VCPU_R10(\base), %r10
	mov	VCPU_R11(\base), %r11
	mov	VCPU_R12(\base), %r12
	mov	VCPU_R13(\base), %r13
	mov	VCPU_R14(\base), %r14
	mov	VCPU_R15(\base), %r15
.endm

.macro SAVE_GUEST_GPRS base
	mov	%rcx, VCPU_RCX(\base)
	mov	%rdx, VCPU_RDX(\base)
	mov	%rbx, VCPU_RBX(\base)
	mov	%rbp, VCPU_RBP(\base)
	mov	%rsi, VCPU_RSI(\base)
	mov	%rdi, VCPU_RDI(\base)
	mov	%r8, VCPU_R8(\base)
	mov	%r9, VCPU_R9(\base)
	mov	%r10, VCPU_R10(\base)
	mov	%r11, VCPU_R11(\base)
	mov	%r12, VCPU_R12(\base)
	mov	%r13, VCPU_R13(\base)
	mov	%r14, VCPU_R14(\base)
	mov	%r15, VCPU_R15(\base)
.endm

/* Leave no guest values in the caller-saved registers. */
.macro CLEAR_CALLER_SAVED
	xor	%ecx, %ecx
	xor	%edx, %edx
	xor	%esi, %esi
	xor	%edi, %edi
	xor	%r8d, %r8d
	xor	%r9d, %r9d
	xor	%r10d, %r10d
	xor	%r11d, %r11d
.endm

#endif /* PYVT_GUEST_GPRS_H */
