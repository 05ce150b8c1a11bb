// SPDX-License-Identifier: MIT
#include "iobus.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

int pvt_bus_init(struct pvt_bus *bus)
{
	memset(bus, 0, sizeof(*bus));
	return -pthread_rwlock_init(&bus->lock, NULL);
}

void pvt_bus_destroy(struct pvt_bus *bus)
{
	free(bus->ranges);
	bus->ranges = NULL;
	bus->count = bus->capacity = 0;
	pthread_rwlock_destroy(&bus->lock);
}

/* Index of the first range whose end is above addr (ranges are sorted). */
static size_t first_ending_after(const struct pvt_bus *bus, uint64_t addr)
{
	size_t lo = 0, hi = bus->count;

	while (lo < hi) {
		size_t mid = lo + (hi - lo) / 2;
		const struct pvt_bus_range *r = &bus->ranges[mid];

		if (r->base + r->len <= addr)
			lo = mid + 1;
		else
			hi = mid;
	}
	return lo;
}

int pvt_bus_register(struct pvt_bus *bus, uint64_t base, uint64_t len,
		     pvt_io_fn fn, void *opaque, int user_id)
{
	size_t at;
	int ret = 0;

	if (len == 0 || base + len < base || (!fn && user_id < 0))
		return -EINVAL;

	pthread_rwlock_wrlock(&bus->lock);
	at = first_ending_after(bus, base);
	if (at < bus->count && bus->ranges[at].base < base + len) {
		ret = -EEXIST;
		goto out;
	}
	if (bus->count == bus->capacity) {
		size_t capacity = bus->capacity ? bus->capacity * 2 : 16;
		struct pvt_bus_range *grown;

		grown = realloc(bus->ranges, capacity * sizeof(*grown));
		if (!grown) {
			ret = -ENOMEM;
			goto out;
		}
		bus->ranges = grown;
		bus->capacity = capacity;
	}
	memmove(&bus->ranges[at + 1], &bus->ranges[at],
		(bus->count - at) * sizeof(*bus->ranges));
	bus->ranges[at] = (struct pvt_bus_range){
		.base = base, .len = len, .fn = fn, .opaque = opaque,
		.user_id = fn ? PVT_NO_USER : user_id,
	};
	bus->count++;
out:
	pthread_rwlock_unlock(&bus->lock);
	return ret;
}

int pvt_bus_unregister(struct pvt_bus *bus, uint64_t base)
{
	size_t at;
	int ret = -ENOENT;

	pthread_rwlock_wrlock(&bus->lock);
	at = first_ending_after(bus, base);
	if (at < bus->count && bus->ranges[at].base == base) {
		memmove(&bus->ranges[at], &bus->ranges[at + 1],
			(bus->count - at - 1) * sizeof(*bus->ranges));
		bus->count--;
		ret = 0;
	}
	pthread_rwlock_unlock(&bus->lock);
	return ret;
}

bool pvt_bus_find(struct pvt_bus *bus, uint64_t addr, uint32_t len,
		  struct pvt_bus_range *out)
{
	bool found = false;
	size_t at;

	pthread_rwlock_rdlock(&bus->lock);
	at = first_ending_after(bus, addr);
	if (at < bus->count) {
		const struct pvt_bus_range *r = &bus->ranges[at];

		if (r->base <= addr && addr + len <= r->base + r->len) {
			*out = *r;
			found = true;
		}
	}
	pthread_rwlock_unlock(&bus->lock);
	return found;
}
