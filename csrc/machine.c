// SPDX-License-Identifier: MIT
#include "machine.h"

#include <errno.h>
#include <string.h>

int pvt_machine_init(struct pvt_machine *machine)
{
	int ret;

	memset(machine, 0, sizeof(*machine));
	ret = pvt_bus_init(&machine->pio);
	if (ret)
		return ret;
	ret = pvt_bus_init(&machine->mmio);
	if (ret)
		goto err_mmio;
	ret = -pthread_mutex_init(&machine->ring_lock, NULL);
	if (ret)
		goto err_lock;
	return 0;

err_lock:
	pvt_bus_destroy(&machine->mmio);
err_mmio:
	pvt_bus_destroy(&machine->pio);
	return ret;
}

void pvt_machine_destroy(struct pvt_machine *machine)
{
	pthread_mutex_destroy(&machine->ring_lock);
	pvt_bus_destroy(&machine->mmio);
	pvt_bus_destroy(&machine->pio);
}

int pvt_machine_add_sink(struct pvt_machine *machine, struct pvt_sink *sink)
{
	if (machine->sink_count == PVT_MACHINE_MAX_SINKS)
		return -ENOSPC;
	machine->sinks[machine->sink_count++] = sink;
	return 0;
}

void pvt_machine_flush(struct pvt_machine *machine)
{
	int i;

	for (i = 0; i < machine->sink_count; i++) {
		struct pvt_sink *sink = machine->sinks[i];

		/* Unlocked peek: only sinks that stream need the lock. */
		if (sink->stream_fd >= 0)
			pvt_sink_flush(sink);
	}
}
