/* SPDX-License-Identifier: MIT */
/*
 * A vCPU state restore's ioctls in one call, without a Python round trip
 * per ioctl: the writes of pyvt.vcpu_state.write (a batch pyvt builds once
 * per state) and of vcpu_state.write_user_mode (what CPL-3 code can
 * change; for a vCPU with KVM_CAP_SYNC_REGS, whose general registers go
 * through the run page, as pyvt writes them anyway).
 */
#ifndef PVT_STATE_WRITES_H
#define PVT_STATE_WRITES_H

#include <linux/kvm.h>
#include <stddef.h>

struct pvt_user_mode_state {
	const struct kvm_regs *regs;
	/* KVM_SET_SREGS2 or KVM_SET_SREGS and its struct; the first
	 * sregs_common bytes (the part both structs share) are compared with
	 * the run page's synced sregs. */
	unsigned long sregs_request;
	const void *sregs;
	size_t sregs_common;
	const void *xsave;  /* KVM_SET_XSAVE's area, or NULL for none */
	const void *fpu;    /* struct kvm_fpu, or NULL when XSAVE covers it */
	const struct kvm_vcpu_events *events; /* or NULL where unsupported */
};

/*
 * Writes `state` into the vCPU behind `fd`.  `synced`: the run page holds
 * the vCPU's sregs and events as the last exit left them (KVM_SYNC_X86_SREGS
 * and _EVENTS), so those equal to the state's are not written again.
 * Returns 0 or -errno (*failed then names the ioctl that failed); *writes
 * counts the state-changing ioctls made, the refused one included.
 */
int pvt_restore_user_mode(int fd, struct kvm_run *run, const struct pvt_user_mode_state *state,
			  int synced, int *writes, const char **failed);

/* One state-changing vCPU ioctl of a batch. */
struct pvt_state_write {
	unsigned long request;
	const void *arg;
	int expect; /* what the ioctl must return (KVM_SET_MSRS: how many it took) */
};

/*
 * Makes the ioctls of `writes` in order on `fd`, stopping at the first that
 * fails or returns other than its `expect`.  Returns how many succeeded
 * (n: all); *error is then that one's -errno, or its return value if it
 * returned another count.
 */
int pvt_state_write_batch(int fd, const struct pvt_state_write *writes, int n, int *error);

#endif
