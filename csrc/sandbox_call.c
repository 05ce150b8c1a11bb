// SPDX-License-Identifier: MIT
#include "sandbox_call.h"

#include <string.h>

#include "page_restore.h"

void pvt_sandbox_enter(struct kvm_run *run, const struct pvt_sandbox_entry *entry,
		       uint64_t function, const uint64_t args[6])
{
	struct kvm_regs *regs = &run->s.regs.regs;

	*regs = *entry->regs;
	regs->rsp = entry->rsp;
	regs->rdi = args[0];
	regs->rsi = args[1];
	regs->rcx = args[3];
	regs->r8 = args[4];
	regs->r9 = args[5];
	if (entry->stub) {
		regs->rip = entry->stub;
		regs->r10 = function;
		regs->r11 = args[2];
	} else {
		regs->rip = function;
		regs->rdx = args[2];
	}
	run->kvm_dirty_regs |= KVM_SYNC_X86_REGS;
}

int pvt_sandbox_reset(int vcpu_fd, struct kvm_run *run, struct pvt_sandbox_reset_plan *reset,
		      int *writes, const char **failed)
{
	uint64_t words = (reset->pages + 63) / 64, i;
	uint64_t reserved_written = 0;
	int rc;

	*failed = NULL;
	rc = pvt_restore_logged_pages(reset->vm_fd, reset->slot, reset->pages, reset->target,
				      reset->image, reset->data, reset->also, reset->written);
	if (rc)
		return rc;
	for (i = 0; i < words; i++) {
		reserved_written |= reset->written[i] & reset->reserved[i];
		reset->written[i] |= reset->also[i];
	}
	memset(reset->also, 0, words * sizeof(*reset->also));
	if (reserved_written)
		return PVT_SANDBOX_RESET_MEMORY;
	/* The run page holds the exit's sregs and events (KVM_SYNC_X86_*). */
	rc = pvt_restore_user_mode(vcpu_fd, run, &reset->state, 1, writes, failed);
	return rc ? rc : PVT_SANDBOX_RESET_DONE;
}
