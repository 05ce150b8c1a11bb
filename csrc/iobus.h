/* SPDX-License-Identifier: MIT */
/*
 * One I/O bus per address space (port I/O, MMIO, MSR indices).  Native
 * devices and the Python handlers registered with vm.on_io()/vm.on_mmio()/
 * vm.on_msr() are both clients:
 * a range is either served by a C callback or tagged with a user id that the
 * run loop hands back to the Cython layer.
 */
#ifndef PVT_IOBUS_H
#define PVT_IOBUS_H

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* What a device callback returns besides 0 (handled) or a negative errno. */
#define PVT_DEV_STOP 1 /* stop the run loop: the device wants the caller */

/*
 * A device access.  offset is relative to the start of the registered range;
 * data holds len bytes (little-endian), filled by the device on reads.
 * stop_code is where a device that returns PVT_DEV_STOP leaves its reason.
 */
typedef int (*pvt_io_fn)(void *opaque, uint64_t offset, uint8_t *data,
			 uint32_t len, bool is_write, uint64_t *stop_code);

#define PVT_NO_USER (-1)

struct pvt_bus_range {
	uint64_t base;
	uint64_t len;
	pvt_io_fn fn;    /* native device, or NULL for a user handler */
	void *opaque;
	int user_id;     /* >= 0: handled by the Python handler with this id */
};

struct pvt_bus {
	pthread_rwlock_t lock;
	struct pvt_bus_range *ranges; /* sorted by base, never overlapping */
	size_t count;
	size_t capacity;
};

int pvt_bus_init(struct pvt_bus *bus);
void pvt_bus_destroy(struct pvt_bus *bus);

/* Returns 0, -EEXIST if [base, base+len) overlaps a range, -EINVAL, -ENOMEM. */
int pvt_bus_register(struct pvt_bus *bus, uint64_t base, uint64_t len,
		     pvt_io_fn fn, void *opaque, int user_id);

/* Removes the range starting exactly at base; -ENOENT if there is none. */
int pvt_bus_unregister(struct pvt_bus *bus, uint64_t base);

/*
 * Copies the range holding [addr, addr+len) into *out.  Returns false when no
 * single range holds the whole access.
 */
bool pvt_bus_find(struct pvt_bus *bus, uint64_t addr, uint32_t len,
		  struct pvt_bus_range *out);

#endif
