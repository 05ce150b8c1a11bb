/* SPDX-License-Identifier: MIT */
/*
 * Restoring what CPL-3 code can change, in one call: the writes of
 * pyvt.vcpu_state.write_user_mode (see its docstring) without a Python
 * round trip per ioctl.  For a vCPU with KVM_CAP_SYNC_REGS: the general
 * registers go through the run page, as pyvt writes them anyway.
 */
#ifndef PVT_USER_MODE_RESTORE_H
#define PVT_USER_MODE_RESTORE_H

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

#endif
