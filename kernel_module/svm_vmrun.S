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
#include "guest_gprs.h"

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
	LOAD_GUEST_GPRS %rax
	mov	8(%rsp), %rax	/* guest VMCB */

	sti
	vmrun	%rax
	cli

	mov	16(%rsp), %rax	/* gprs */
	SAVE_GUEST_GPRS %rax

	mov	8(%rsp), %rax	/* guest VMCB */
	vmsave	%rax
	pop	%rax		/* host save area */
	vmload	%rax

	CLEAR_CALLER_SAVED

	add	$16, %rsp
	pop	%rbx
	pop	%r12
	pop	%r13
	pop	%r14
	pop	%r15
	pop	%rbp
	RET
SYM_FUNC_END(pyvt_svm_enter)
