/* SPDX-License-Identifier: MIT */
/*
 * The native half of a VM: its buses (port I/O, MMIO, and MSRs, whose
 * "addresses" are MSR indices) and the lock that serialises draining KVM's
 * coalesced-write ring (one ring per VM, seen by every vCPU).
 */
#ifndef PVT_MACHINE_H
#define PVT_MACHINE_H

#include <pthread.h>
#include <stdbool.h>

#include "iobus.h"

struct pvt_machine {
	struct pvt_bus pio;
	struct pvt_bus mmio;
	struct pvt_bus msr; /* RDMSR/WRMSR exits (KVM_CAP_X86_USER_SPACE_MSR) */
	pthread_mutex_t ring_lock;
	/*
	 * Like a PC: accesses nothing claims read as all ones and writes are
	 * dropped, instead of stopping the run.
	 */
	bool unclaimed_as_pc;
};

int pvt_machine_init(struct pvt_machine *machine);
void pvt_machine_destroy(struct pvt_machine *machine);

#endif
