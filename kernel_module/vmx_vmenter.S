/* SPDX-License-Identifier: GPL-2.0 */
/*
 * One Intel VT-x world switch, and the NMI hand-off after an NMI exit.
 * The caller has interrupts off and the vCPU's VMCS current on this CPU.
 * Guest RSP and RIP live in the VMCS; the other guest GPRs are swapped
 * here.  A VM exit lands at pyvt_vmx_exit (the VMCS HOST_RIP) with RSP
 * as written to HOST_RSP just before entering.
 */
#include <linux/linkage.h>
#include <asm/asm.h>
#include <asm/ibt.h>
#include <asm/unwind_hints.h>
#include <asm/nospec-branch.h>
#include <asm/segment.h>
#include "guest_gprs.h"

/* The VMCS field encoding of HOST_RSP (<asm/vmx.h> is C only). */
#define VMCS_HOST_RSP	0x6c14

	.text

/*
 * int pyvt_vmx_enter(unsigned long *gprs, bool launched)
 * Returns 0 after a VM exit, 1 if VMLAUNCH/VMRESUME failed (VMfail; the
 * VM-instruction error field says why).
 */
SYM_FUNC_START(pyvt_vmx_enter)
	push	%rbp
	mov	%rsp, %rbp
	push	%r15
	push	%r14
	push	%r13
	push	%r12
	push	%rbx
	push	%rdi		/* gprs: 0(%rsp) from here on */

	/* A VM exit comes back with exactly this stack. */
	mov	$VMCS_HOST_RSP, %rax
	vmwrite	%rsp, %rax
	jbe	.Lvmfail

	mov	%rdi, %rax
	/* Pick VMRESUME or VMLAUNCH now: the MOVs below keep the flags. */
	test	%sil, %sil
	LOAD_GUEST_GPRS %rax
	mov	VCPU_RAX(%rax), %rax
	jz	.Lvmlaunch

	/* A successful entry resumes at pyvt_vmx_exit, not below. */
	UNWIND_HINT_SAVE
	vmresume
	jmp	.Lvmfail
.Lvmlaunch:
	vmlaunch
	jmp	.Lvmfail

SYM_INNER_LABEL(pyvt_vmx_exit, SYM_L_GLOBAL)
	UNWIND_HINT_RESTORE
	ENDBR
	push	%rax		/* guest RAX */
	mov	8(%rsp), %rax	/* gprs */
	pop	VCPU_RAX(%rax)
	SAVE_GUEST_GPRS %rax
	xor	%eax, %eax
	jmp	.Lout

.Lvmfail:
	mov	$1, %eax

.Lout:
	CLEAR_CALLER_SAVED

	add	$8, %rsp	/* gprs */
	pop	%rbx
	pop	%r12
	pop	%r13
	pop	%r14
	pop	%r15
	pop	%rbp
	RET
SYM_FUNC_END(pyvt_vmx_enter)

/*
 * void pyvt_vmx_do_nmi(void)
 * An NMI that caused a VM exit was taken by the exit, not by the host:
 * hand it to Linux's NMI handler through a hardware-like interrupt
 * frame, whose IRET also ends the NMI blocking the exit left behind.
 * Interrupts must be off.
 */
SYM_FUNC_START(pyvt_vmx_do_nmi)
	push	%rbp
	mov	%rsp, %rbp
	and	$-16, %rsp
	push	$__KERNEL_DS
	push	%rbp
	pushf
	push	$__KERNEL_CS
	call	asm_exc_nmi_noist
	leave
	RET
SYM_FUNC_END(pyvt_vmx_do_nmi)
