// SPDX-License-Identifier: MIT
#include "state_writes.h"

#include <errno.h>
#include <string.h>
#include <sys/ioctl.h>

static int write_one(int fd, unsigned long request, const void *arg, const char *name,
		     int *writes, const char **failed)
{
	(*writes)++; /* counted even if refused: it may have changed something */
	if (ioctl(fd, request, arg) == 0)
		return 0;
	*failed = name;
	return -errno;
}

int pvt_restore_user_mode(int fd, struct kvm_run *run, const struct pvt_user_mode_state *state,
			  int synced, int *writes, const char **failed)
{
	int rc;

	/* Order as vcpu_state.write_user_mode: registers, sregs, XSAVE, FPU, events. */
	run->s.regs.regs = *state->regs;
	run->kvm_dirty_regs |= KVM_SYNC_X86_REGS;
	if (!synced || memcmp(&run->s.regs.sregs, state->sregs, state->sregs_common)) {
		rc = write_one(fd, state->sregs_request, state->sregs,
			       state->sregs_request == KVM_SET_SREGS ? "KVM_SET_SREGS" :
								       "KVM_SET_SREGS2",
			       writes, failed);
		if (rc)
			return rc;
	}
	if (state->xsave) {
		rc = write_one(fd, KVM_SET_XSAVE, state->xsave, "KVM_SET_XSAVE", writes, failed);
		if (rc)
			return rc;
	}
	if (state->fpu) {
		rc = write_one(fd, KVM_SET_FPU, state->fpu, "KVM_SET_FPU", writes, failed);
		if (rc)
			return rc;
	}
	if (state->events &&
	    (!synced || memcmp(&run->s.regs.events, state->events, sizeof(*state->events)))) {
		rc = write_one(fd, KVM_SET_VCPU_EVENTS, state->events, "KVM_SET_VCPU_EVENTS",
			       writes, failed);
		if (rc)
			return rc;
	}
	return 0;
}

int pvt_state_write_batch(int fd, const struct pvt_state_write *writes, int n, int *error)
{
	int i;

	*error = 0;
	for (i = 0; i < n; i++) {
		int ret = ioctl(fd, writes[i].request, writes[i].arg);

		if (ret < 0) {
			*error = -errno;
			return i;
		}
		if (ret != writes[i].expect) {
			*error = ret;
			return i;
		}
	}
	return n;
}
