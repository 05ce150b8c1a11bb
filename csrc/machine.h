/* SPDX-License-Identifier: MIT */
/*
 * The native half of a VM: its two I/O buses, the lock that serialises
 * draining KVM's coalesced-write ring (one ring per VM, seen by every vCPU),
 * and the output sinks to flush when the run loop reaches a safe point.
 */
#ifndef PVT_MACHINE_H
#define PVT_MACHINE_H

#include <pthread.h>
#include <stdbool.h>

#include "iobus.h"
#include "sink.h"

#define PVT_MACHINE_MAX_SINKS 16

struct pvt_machine {
	struct pvt_bus pio;
	struct pvt_bus mmio;
	pthread_mutex_t ring_lock;
	struct pvt_sink *sinks[PVT_MACHINE_MAX_SINKS];
	int sink_count;
	/*
	 * Like a PC: accesses nothing claims read as all ones and writes are
	 * dropped, instead of stopping the run.
	 */
	bool unclaimed_as_pc;
};

int pvt_machine_init(struct pvt_machine *machine);
void pvt_machine_destroy(struct pvt_machine *machine);
int pvt_machine_add_sink(struct pvt_machine *machine, struct pvt_sink *sink);
void pvt_machine_flush(struct pvt_machine *machine);

#endif
