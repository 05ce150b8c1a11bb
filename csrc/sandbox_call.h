/* SPDX-License-Identifier: MIT */
/*
 * A pyvt.Sandbox call's native steps: its entry (the registers, through the
 * run page) and the reset after a call that returned, in one native call:
 * the pages the call wrote go back to the snapshot's (page_restore.h), and,
 * if the call provably ran at CPL 3 only, the vCPU gets back what CPL-3 code
 * can change (state_writes.h: registers through the run page, segment
 * registers and events only where they differ).
 *
 * Why a clean dirty log proves it: from CPL 3 the only ways into CPL 0 are
 * the gates of the IDT and GDT and SYSCALL/SYSENTER.  pyvt's ring-3 setup
 * leaves EFER.SCE and the SYSENTER MSRs clear, its GDT holds no call gate,
 * and every IDT gate leads to a stub that ends the run (a failed call, reset
 * in full).  So a guest that reached CPL 0 and came back to the return
 * trampoline must first have written pyvt's reserved area (its page tables,
 * GDT, IDT, TSS, stubs or exception stack): KVM's dirty log shows that, and
 * then the caller writes the whole state.  pyvt's page tables carry their
 * accessed and dirty bits already, so the CPU never writes them itself.
 */
#ifndef PVT_SANDBOX_CALL_H
#define PVT_SANDBOX_CALL_H

#include <stdint.h>

#include "state_writes.h"

/*
 * Where and how calls enter.  With an entry stub (ring 3: see
 * pyvt/sandbox.py), RIP is the stub, which reloads the x87/SSE state from
 * the snapshot's image in guest memory, sets RDX from R11 and RAX to 0, and
 * jumps to R10: the function.  Without one, RIP is the function.
 */
struct pvt_sandbox_entry {
	const struct kvm_regs *regs; /* the snapshot's: every other register */
	uint64_t stub;               /* 0: none */
	uint64_t rsp;                /* where the return address is */
};

/* Puts the registers of a call of `function` with SysV `args` in the run page. */
void pvt_sandbox_enter(struct kvm_run *run, const struct pvt_sandbox_entry *entry,
		       uint64_t function, const uint64_t args[6]);

struct pvt_sandbox_reset_plan {
	int vm_fd;
	uint32_t slot;
	uint64_t pages;             /* of the slot, mapped at target */
	uint8_t *target;
	const uint8_t *image;       /* the snapshot's copy of the slot */
	const uint64_t *data;       /* the image's data pages (else zero pages) */
	const uint64_t *reserved;   /* pyvt's reserved area: written = maybe CPL 0 */
	uint64_t *also;             /* pages the host wrote for the call; cleared */
	uint64_t *written;          /* out: the pages copied back (logged | also) */
	struct pvt_user_mode_state state;
};

enum pvt_sandbox_reset_result {
	PVT_SANDBOX_RESET_DONE = 0,     /* memory and user-mode state are the snapshot's */
	PVT_SANDBOX_RESET_MEMORY = 1,   /* memory only: the caller writes the whole state */
};

/*
 * Returns an enum pvt_sandbox_reset_result, or -errno: from
 * KVM_GET_DIRTY_LOG (*failed NULL, nothing copied) or from a state write
 * (*failed names it; memory was restored).  *writes counts the
 * state-changing ioctls made.
 */
int pvt_sandbox_reset(int vcpu_fd, struct kvm_run *run, struct pvt_sandbox_reset_plan *reset,
		      int *writes, const char **failed);

#endif
