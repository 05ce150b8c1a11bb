/* SPDX-License-Identifier: MIT */
/*
 * Coalescing a device's data register from its first write on.
 *
 * KVM can queue writes to a port in the coalesced ring instead of exiting
 * (KVM_REGISTER_COALESCED_MMIO with pio = 1): a console's data register
 * never needs the vCPU to stop.  But registering a zone starts an SRCU
 * grace period in the kernel, and closing the VM within it waits for it
 * (about 15 ms on these hosts): a VM that lives a millisecond would pay it
 * at close.  So the zone is registered lazily, by the first guest write to
 * the port: a VM whose guest never writes there never pays.
 *
 * pvt_lazy_coalesce_io wraps the device's own entry point on the bus; its
 * opaque is a struct pvt_lazy_coalesce.  Writes are forwarded unchanged
 * (replays from the coalesced ring come through here too).
 */
#ifndef PVT_LAZY_COALESCE_H
#define PVT_LAZY_COALESCE_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

#include "iobus.h"

enum pvt_lazy_coalesce_state {
	PVT_COALESCE_ARMED,      /* registers the zone at the next write */
	PVT_COALESCE_REGISTERED, /* KVM queues the writes */
	PVT_COALESCE_OFF,        /* disabled, or KVM refused the zone */
};

struct pvt_lazy_coalesce {
	pthread_mutex_t lock; /* serialises registering against disabling */
	int state;            /* enum pvt_lazy_coalesce_state, read atomically */
	int vm_fd;
	uint64_t port;        /* the zone: one port, the device's first */
	pvt_io_fn fn;         /* the device's own entry point and opaque */
	void *opaque;
};

void pvt_lazy_coalesce_init(struct pvt_lazy_coalesce *lazy, int vm_fd,
			    uint64_t port, pvt_io_fn fn, void *opaque);
void pvt_lazy_coalesce_destroy(struct pvt_lazy_coalesce *lazy);

int pvt_lazy_coalesce_io(void *opaque, uint64_t offset, uint8_t *data,
			 uint32_t len, bool is_write, uint64_t *stop_code);

/*
 * Stops coalescing: no zone is registered from now on, and one that was is
 * unregistered (the caller replays the ring first).  Returns 0 or -errno
 * of KVM_UNREGISTER_COALESCED_MMIO.
 */
int pvt_lazy_coalesce_disable(struct pvt_lazy_coalesce *lazy);

/* The current enum pvt_lazy_coalesce_state. */
int pvt_lazy_coalesce_state(struct pvt_lazy_coalesce *lazy);

#endif
