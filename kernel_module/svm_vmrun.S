/* SPDX-License-Identifier: GPL-2.0 */
/*
 * One AMD-V world switch.  The caller has interrupts and GIF cleared.
 * Host FS/GS/TR/LDTR and the syscall MSRs go through VMSAVE/VMLOAD; GIF
 * stays clear until the host's state is back, so no NMI can see the
 * guest's GS base.  Interrupts are enabled (HIF=1) across VMRUN so a host
 * interrupt exits the guest; it is taken after the caller sets GIF.
 */
#include <linux/linkage.h>
#include <asm/nospec-branch.h>

/* Offsets into unsigned long gprs[16], in x86 register-number order. */
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

	.text

/*
 * void pyvt_svm_enter(u64 vmcb_pa, u64 host_save_pa, unsigned long *gprs)
 * RAX and RSP live in the VMCB; the other guest GPRs are swapped here.
 */
SYM_FUNC_START(pyvt_svm_enter)
	push	%rbp
	push	%r15
	push	%r14
	push	%r13
	push	%r12
	push	%rbx
	push	%rdx		/* gprs */
	push	%rdi		/* guest VMCB */

	mov	%rsi, %rax
	vmsave	%rax
	push	%rsi		/* host save area */

	mov	%rdi, %rax
	vmload	%rax

	mov	%rdx, %rax
	mov	VCPU_RCX(%rax), %rcx
	mov	VCPU_RDX(%rax), %rdx
	mov	VCPU_RBX(%rax), %rbx
	mov	VCPU_RBP(%rax), %rbp
	mov	VCPU_RSI(%rax), %rsi
	mov	VCPU_RDI(%rax), %rdi
	mov	VCPU_R8(%rax), %r8
	mov	VCPU_R9(%rax), %r9
	mov	VCPU_R10(%rax), %r10
	mov	VCPU_R11(%rax), %r11
	mov	VCPU_R12(%rax), %r12
	mov	VCPU_R13(%rax), %r13
	mov	VCPU_R14(%rax), %r14
	mov	VCPU_R15(%rax), %r15
	mov	8(%rsp), %rax	/* guest VMCB */

	sti
	vmrun	%rax
	cli

	mov	16(%rsp), %rax	/* gprs */
	mov	%rcx, VCPU_RCX(%rax)
	mov	%rdx, VCPU_RDX(%rax)
	mov	%rbx, VCPU_RBX(%rax)
	mov	%rbp, VCPU_RBP(%rax)
	mov	%rsi, VCPU_RSI(%rax)
	mov	%rdi, VCPU_RDI(%rax)
	mov	%r8, VCPU_R8(%rax)
	mov	%r9, VCPU_R9(%rax)
	mov	%r10, VCPU_R10(%rax)
	mov	%r11, VCPU_R11(%rax)
	mov	%r12, VCPU_R12(%rax)
	mov	%r13, VCPU_R13(%rax)
	mov	%r14, VCPU_R14(%rax)
	mov	%r15, VCPU_R15(%rax)

	mov	8(%rsp), %rax	/* guest VMCB */
	vmsave	%rax
	pop	%rax		/* host save area */
	vmload	%rax

	/* Leave no guest values in caller-saved registers. */
	xor	%ecx, %ecx
	xor	%edx, %edx
	xor	%esi, %esi
	xor	%edi, %edi
	xor	%r8d, %r8d
	xor	%r9d, %r9d
	xor	%r10d, %r10d
	xor	%r11d, %r11d

	add	$16, %rsp
	pop	%rbx
	pop	%r12
	pop	%r13
	pop	%r14
	pop	%r15
	pop	%rbp
	RET
SYM_FUNC_END(pyvt_svm_enter)
