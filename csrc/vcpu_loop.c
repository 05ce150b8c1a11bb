// SPDX-License-Identifier: MIT
#include "vcpu_loop.h"

#include <errno.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>

enum claim {
	CLAIM_NONE,   /* no range holds the access */
	CLAIM_DONE,   /* a native device handled it */
	CLAIM_USER,   /* a Python handler's range */
	CLAIM_STOP,   /* a native device asked to stop the run */
};

void pvt_vcpu_init(struct pvt_vcpu *vcpu, int fd, struct kvm_run *run,
		   size_t run_size, struct pvt_machine *machine,
		   void *ring_page, long page_size)
{
	memset(vcpu, 0, sizeof(*vcpu));
	vcpu->fd = fd;
	vcpu->run = run;
	vcpu->run_size = run_size;
	vcpu->machine = machine;
	vcpu->kick_masked = pvt_kick_mask_vcpu(fd) == 0;
	if (ring_page) {
		vcpu->ring = ring_page;
		vcpu->ring_entries =
			(uint32_t)(((size_t)page_size -
				    sizeof(struct kvm_coalesced_mmio_ring)) /
				   sizeof(struct kvm_coalesced_mmio));
	}
}

void pvt_vcpu_destroy(struct pvt_vcpu *vcpu)
{
	vcpu->run = NULL;
	vcpu->ring = NULL;
}

/*
 * The range holding an access.  A port access belongs to the range holding
 * its first port, whatever its width (outl to 0xf4 is one access to port
 * 0xf4, as in kvmtool), and an MSR access to the range holding its index;
 * an MMIO access must fit in its range.
 */
static bool find_range(struct pvt_machine *machine, struct pvt_bus *bus,
		       uint64_t addr, uint32_t len, struct pvt_bus_range *range)
{
	return pvt_bus_find(bus, addr, bus == &machine->mmio ? len : 1, range);
}

/* Serves one access with the range find_range() gave (NULL: none). */
static enum claim serve(struct pvt_machine *machine,
			const struct pvt_bus_range *range, uint64_t addr,
			uint8_t *data, uint32_t len, bool is_write,
			struct pvt_stop_info *info)
{
	if (!range) {
		/*
		 * Nobody claims it: a read reads as all ones, as on a PC's
		 * empty bus, unless the caller answers it (Vcpu.reply()).
		 */
		if (!is_write)
			memset(data, 0xff, len);
		return machine->unclaimed_as_pc ? CLAIM_DONE : CLAIM_NONE;
	}
	if (!range->fn) {
		info->user_id = range->user_id;
		return CLAIM_USER;
	}
	if (range->fn(range->opaque, addr - range->base, data, len, is_write,
		      &info->stop_code) == PVT_DEV_STOP) {
		info->device_port = addr;
		return CLAIM_STOP;
	}
	return CLAIM_DONE;
}

static enum claim dispatch(struct pvt_machine *machine, struct pvt_bus *bus,
			   uint64_t addr, uint8_t *data, uint32_t len,
			   bool is_write, struct pvt_stop_info *info)
{
	struct pvt_bus_range range;
	bool found = find_range(machine, bus, addr, len, &range);

	return serve(machine, found ? &range : NULL, addr, data, len, is_write,
		     info);
}

void pvt_vcpu_drain_coalesced(struct pvt_vcpu *vcpu)
{
	struct kvm_coalesced_mmio_ring *ring = vcpu->ring;
	struct pvt_machine *machine = vcpu->machine;
	struct pvt_stop_info ignored;

	if (!ring ||
	    __atomic_load_n(&ring->first, __ATOMIC_RELAXED) ==
		    __atomic_load_n(&ring->last, __ATOMIC_ACQUIRE))
		return;

	pthread_mutex_lock(&machine->ring_lock);
	for (;;) {
		uint32_t first = ring->first;
		struct kvm_coalesced_mmio *entry;

		if (first == __atomic_load_n(&ring->last, __ATOMIC_ACQUIRE))
			break;
		entry = &ring->coalesced_mmio[first];
		/* Only native write-only registers are coalesced. */
		dispatch(machine, entry->pio ? &machine->pio : &machine->mmio,
			 entry->phys_addr, entry->data,
			 entry->len <= sizeof(entry->data) ? entry->len :
							     sizeof(entry->data),
			 true, &ignored);
		vcpu->coalesced++;
		__atomic_store_n(&ring->first, (first + 1) % vcpu->ring_entries,
				 __ATOMIC_RELEASE);
	}
	pthread_mutex_unlock(&machine->ring_lock);
}

/*
 * A backend must keep an I/O exit's data inside the vCPU mapping (KVM does);
 * a buggy one must not make the run loop read or write outside it.
 */
bool pvt_vcpu_io_data_valid(const struct pvt_vcpu *vcpu)
{
	const struct kvm_run *run = vcpu->run;
	uint64_t bytes = (uint64_t)run->io.size * run->io.count;

	return run->io.size && run->io.size <= 8 &&
	       run->io.data_offset >= sizeof(*run) &&
	       run->io.data_offset <= vcpu->run_size &&
	       bytes <= vcpu->run_size - run->io.data_offset;
}

static enum claim handle_io(struct pvt_vcpu *vcpu, struct pvt_stop_info *info)
{
	struct kvm_run *run = vcpu->run;
	struct pvt_machine *machine = vcpu->machine;
	uint8_t *data = (uint8_t *)run + run->io.data_offset;
	bool is_write = run->io.direction == KVM_EXIT_IO_OUT;
	struct pvt_bus_range range;
	bool found = find_range(machine, &machine->pio, run->io.port,
				run->io.size, &range);
	uint32_t i;

	/*
	 * String I/O: one port, so one lookup; the device sees each element in
	 * turn, like the bus.
	 */
	for (i = 0; i < run->io.count; i++) {
		enum claim claim = serve(machine, found ? &range : NULL,
					 run->io.port,
					 data + (size_t)i * run->io.size,
					 run->io.size, is_write, info);

		if (claim != CLAIM_DONE)
			return claim;
	}
	return CLAIM_DONE;
}

static enum claim handle_mmio(struct pvt_vcpu *vcpu,
			      struct pvt_stop_info *info)
{
	struct kvm_run *run = vcpu->run;

	if (run->mmio.len > sizeof(run->mmio.data))
		return CLAIM_NONE;
	return dispatch(vcpu->machine, &vcpu->machine->mmio,
			run->mmio.phys_addr, run->mmio.data, run->mmio.len,
			run->mmio.is_write, info);
}

/*
 * A RDMSR/WRMSR that KVM sent to user space (KVM_CAP_X86_USER_SPACE_MSR):
 * msr.data is the 8-byte little-endian value, as on the other buses.  An
 * MSR nobody claims always goes to the caller (only the caller asked KVM
 * for these exits): a PC's empty bus has no word for MSRs.
 */
static enum claim handle_msr(struct pvt_vcpu *vcpu, struct pvt_stop_info *info)
{
	struct kvm_run *run = vcpu->run;
	struct pvt_machine *machine = vcpu->machine;
	bool is_write = run->exit_reason == KVM_EXIT_X86_WRMSR;
	struct pvt_bus_range range;

	if (!find_range(machine, &machine->msr, run->msr.index, 1, &range)) {
		/* Unless the caller answers it (Vcpu.reply()): all ones. */
		if (!is_write)
			run->msr.data = UINT64_MAX;
		return CLAIM_NONE;
	}
	return serve(machine, &range, run->msr.index, (uint8_t *)&run->msr.data,
		     sizeof(run->msr.data), is_write, info);
}

static int stop_for(enum claim claim, int user_stop)
{
	switch (claim) {
	case CLAIM_USER:
		return user_stop;
	case CLAIM_STOP:
		return PVT_STOP_DEVICE;
	default:
		return PVT_STOP_EXIT;
	}
}

/* What the exit in kvm_run leaves for the next KVM_RUN to complete. */
enum pvt_pending_io pvt_vcpu_exit_pending_io(const struct kvm_run *run)
{
	switch (run->exit_reason) {
	case KVM_EXIT_IO:
		return run->io.direction == KVM_EXIT_IO_OUT ? PVT_PENDING_WRITE :
							      PVT_PENDING_READ;
	case KVM_EXIT_MMIO:
		return run->mmio.is_write ? PVT_PENDING_WRITE :
					    PVT_PENDING_READ;
	case KVM_EXIT_X86_RDMSR:
		return PVT_PENDING_READ;
	case KVM_EXIT_X86_WRMSR:
		return PVT_PENDING_WRITE;
	default:
		return PVT_PENDING_NONE;
	}
}

/* A signal or kick ended KVM_RUN. */
static int interrupted(struct pvt_vcpu *vcpu)
{
	vcpu->run->immediate_exit = 0;
	/* Still blocked outside KVM_RUN, it would end the next one at once. */
	if (vcpu->kick_masked)
		pvt_kick_consume();
	return PVT_STOP_INTERRUPTED;
}

/* One more return from KVM_RUN in exits_by_reason. */
static void count_exit(struct pvt_vcpu *vcpu, int ret, int err)
{
	uint32_t reason;

	if (ret < 0 && err != EINTR)
		return; /* KVM_RUN failed: no exit reason */
	reason = ret < 0 ? KVM_EXIT_INTR : vcpu->run->exit_reason;
	if (reason >= PVT_EXIT_REASON_SLOTS)
		reason = PVT_EXIT_REASON_SLOTS - 1;
	vcpu->exits_by_reason[reason]++;
}

/* pvt_vcpu_run() without its bookkeeping of the pending access. */
static int run_until_stop(struct pvt_vcpu *vcpu, struct pvt_stop_info *info)
{
	struct kvm_run *run = vcpu->run;

	for (;;) {
		enum claim claim;
		struct timespec entered, left;
		int ret, err;

		/* vDSO clock reads: tens of ns against a KVM_RUN of microseconds. */
		clock_gettime(CLOCK_MONOTONIC, &entered);
		ret = ioctl(vcpu->fd, KVM_RUN, 0);
		err = errno;
		clock_gettime(CLOCK_MONOTONIC, &left);
		vcpu->guest_ns += (uint64_t)(left.tv_sec - entered.tv_sec) *
					  1000000000u +
				  (uint64_t)(left.tv_nsec - entered.tv_nsec);
		vcpu->kvm_exits++;
		count_exit(vcpu, ret, err);
		/* Coalesced writes happened before this exit: replay them first. */
		pvt_vcpu_drain_coalesced(vcpu);
		if (ret < 0) {
			if (err == EAGAIN)
				continue;
			if (err == EINTR)
				return interrupted(vcpu);
			return -err;
		}

		switch (run->exit_reason) {
		case KVM_EXIT_IO:
			if (!pvt_vcpu_io_data_valid(vcpu))
				return PVT_STOP_BAD_EXIT;
			claim = handle_io(vcpu, info);
			if (claim == CLAIM_DONE)
				break;
			return stop_for(claim, PVT_STOP_USER_IO);
		case KVM_EXIT_MMIO:
			claim = handle_mmio(vcpu, info);
			if (claim == CLAIM_DONE)
				break;
			return stop_for(claim, PVT_STOP_USER_MMIO);
		case KVM_EXIT_X86_RDMSR:
		case KVM_EXIT_X86_WRMSR:
			claim = handle_msr(vcpu, info);
			if (claim == CLAIM_DONE)
				break;
			return stop_for(claim, PVT_STOP_USER_MSR);
		case KVM_EXIT_INTR:
			return interrupted(vcpu);
		default:
			return PVT_STOP_EXIT;
		}
		vcpu->native_exits++;
	}
}

int pvt_vcpu_run(struct pvt_vcpu *vcpu, struct pvt_stop_info *info)
{
	int stop = run_until_stop(vcpu, info);

	/*
	 * Every KVM_RUN completed what the exit before it left pending; only
	 * the exit the loop stops at can leave something (set here, once, not
	 * on each exit the loop serves).
	 */
	vcpu->pending_io = stop < 0 || stop == PVT_STOP_INTERRUPTED ?
				   PVT_PENDING_NONE :
				   pvt_vcpu_exit_pending_io(vcpu->run);
	return stop;
}
