/* SPDX-License-Identifier: MIT */
/*
 * The vCPU run loop: KVM_RUN, drain coalesced writes, dispatch port I/O,
 * MMIO and MSR accesses to their buses, and return to the caller only for what it must
 * see (an exit nobody claimed, a Python handler's range, a device that
 * stops the run, or a kick).
 */
#ifndef PVT_VCPU_LOOP_H
#define PVT_VCPU_LOOP_H

#include <linux/kvm.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kick.h"
#include "machine.h"

enum pvt_stop {
	PVT_STOP_EXIT = 0,        /* a KVM exit nobody claimed: see kvm_run */
	PVT_STOP_USER_IO = 1,     /* port I/O for Python handler user_id */
	PVT_STOP_USER_MMIO = 2,   /* MMIO for Python handler user_id */
	PVT_STOP_DEVICE = 3,      /* a native device stopped: see stop_code */
	PVT_STOP_INTERRUPTED = 4, /* a signal or kick ended KVM_RUN */
	PVT_STOP_BAD_EXIT = 5,    /* the backend reported I/O data outside kvm_run */
	PVT_STOP_USER_MSR = 6,    /* RDMSR/WRMSR for Python handler user_id */
};

/*
 * What KVM still owes the last exit: after a port-I/O, MMIO or user-space
 * MSR exit, the instruction is only finished by the next KVM_RUN (a read
 * copies its data from kvm_run into the registers; both advance RIP, or an
 * MSR access with msr.error set takes #GP).  See io_completion.h.
 */
enum pvt_pending_io {
	PVT_PENDING_NONE = 0,
	PVT_PENDING_READ = 1,  /* an in / MMIO read / rdmsr waits for its data */
	PVT_PENDING_WRITE = 2, /* an out / MMIO write / wrmsr waits to be retired */
};

/*
 * Slots of pvt_vcpu.exits_by_reason: one per KVM exit reason below this
 * (x86 uses 0-37 in Linux 6.x), the last one for every reason at or above it.
 */
#define PVT_EXIT_REASON_SLOTS 64

struct pvt_stop_info {
	int user_id;
	uint64_t stop_code;  /* from the device (debug-exit: the value) */
	uint64_t device_port;
};

struct pvt_vcpu {
	int fd;
	struct kvm_run *run;
	size_t run_size; /* bytes mapped at run: I/O data must lie inside */
	struct pvt_machine *machine;
	struct kvm_coalesced_mmio_ring *ring; /* NULL: no coalescing */
	uint32_t ring_entries;
	uint64_t kvm_exits;    /* every return from KVM_RUN */
	uint64_t native_exits; /* exits handled without leaving C */
	uint64_t coalesced;    /* writes drained from the coalesced ring */
	/* Returns from KVM_RUN by kvm_run.exit_reason (an EINTR counts as INTR). */
	uint64_t exits_by_reason[PVT_EXIT_REASON_SLOTS];
	uint64_t guest_ns; /* CLOCK_MONOTONIC time spent inside KVM_RUN */
	enum pvt_pending_io pending_io; /* what the next KVM_RUN completes */
	bool kick_masked; /* KVM_SET_SIGNAL_MASK lets the kick in (kick.h) */
};

/*
 * ring_page: the vCPU mmap's coalesced page, or NULL; page_size sets the
 * ring's capacity exactly as the kernel computes KVM_COALESCED_MMIO_MAX.
 */
void pvt_vcpu_init(struct pvt_vcpu *vcpu, int fd, struct kvm_run *run,
		   size_t run_size, struct pvt_machine *machine,
		   void *ring_page, long page_size);
void pvt_vcpu_destroy(struct pvt_vcpu *vcpu);

/* Returns an enum pvt_stop, or -errno when KVM_RUN itself fails. */
int pvt_vcpu_run(struct pvt_vcpu *vcpu, struct pvt_stop_info *info);

/* What the exit now in kvm_run leaves for the next KVM_RUN to complete. */
enum pvt_pending_io pvt_vcpu_exit_pending_io(const struct kvm_run *run);

/* True if the current I/O exit's data lies inside the vCPU mapping. */
bool pvt_vcpu_io_data_valid(const struct pvt_vcpu *vcpu);

/* Writes what is waiting in the coalesced ring to its devices, in order. */
void pvt_vcpu_drain_coalesced(struct pvt_vcpu *vcpu);

#endif
