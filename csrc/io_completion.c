// SPDX-License-Identifier: MIT
#include "io_completion.h"

#include <errno.h>
#include <string.h>
#include <sys/ioctl.h>

/* Gives a further round trip of the same instruction its default answer. */
static int answer_alone(struct pvt_vcpu *vcpu)
{
	struct kvm_run *run = vcpu->run;

	switch (run->exit_reason) {
	case KVM_EXIT_IO:
		if (!pvt_vcpu_io_data_valid(vcpu))
			return -EPROTO;
		if (run->io.direction == KVM_EXIT_IO_IN)
			memset((uint8_t *)run + run->io.data_offset, 0xff,
			       (size_t)run->io.size * run->io.count);
		break;
	case KVM_EXIT_MMIO:
		if (!run->mmio.is_write)
			memset(run->mmio.data, 0xff, sizeof(run->mmio.data));
		break;
	case KVM_EXIT_X86_RDMSR:
		/*
		 * KVM completes RDMSR in one round trip, so this is another
		 * instruction's: answered as the run loop answers an MSR
		 * nobody claims.
		 */
		run->msr.error = 0;
		run->msr.data = UINT64_MAX;
		break;
	default: /* a write: KVM retires it as it is */
		break;
	}
	return 0;
}

int pvt_vcpu_finish_io(struct pvt_vcpu *vcpu)
{
	struct kvm_run *run = vcpu->run;
	int rounds = 0;

	while (vcpu->pending_io != PVT_PENDING_NONE) {
		int ret, err;

		if (++rounds > PVT_SETTLE_ROUNDS)
			return -EBUSY;
		run->immediate_exit = 1;
		ret = ioctl(vcpu->fd, KVM_RUN, 0);
		err = errno;
		run->immediate_exit = 0;
		vcpu->kvm_exits++;
		if (ret < 0 && err == EAGAIN)
			continue;
		if (ret < 0) {
			vcpu->pending_io = PVT_PENDING_NONE;
			/* EINTR: completed, and no guest code ran. */
			return err == EINTR ? 0 : -err;
		}
		/* The instruction needs another round trip (see the header). */
		vcpu->pending_io = pvt_vcpu_exit_pending_io(run);
		if (vcpu->pending_io == PVT_PENDING_NONE)
			return -EPROTO;
		ret = answer_alone(vcpu);
		if (ret)
			return ret;
	}
	return 0;
}

int pvt_vcpu_abandon_io(struct pvt_vcpu *vcpu)
{
	struct kvm_run *run = vcpu->run;
	bool synced = run->kvm_valid_regs & KVM_SYNC_X86_REGS;
	struct kvm_regs saved;
	int ret;

	if (vcpu->pending_io != PVT_PENDING_READ)
		return pvt_vcpu_finish_io(vcpu);
	if (synced)
		saved = run->s.regs.regs;
	else if (ioctl(vcpu->fd, KVM_GET_REGS, &saved))
		return -errno;
	ret = pvt_vcpu_finish_io(vcpu);
	if (ret)
		return ret;
	if (synced) {
		/* KVM loads them from kvm_run on the next KVM_RUN. */
		run->s.regs.regs = saved;
		run->kvm_dirty_regs |= KVM_SYNC_X86_REGS;
	} else if (ioctl(vcpu->fd, KVM_SET_REGS, &saved)) {
		return -errno;
	}
	return 0;
}
