// SPDX-License-Identifier: MIT
#include "machine.h"

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
	ret = pvt_bus_init(&machine->msr);
	if (ret)
		goto err_msr;
	ret = -pthread_mutex_init(&machine->ring_lock, NULL);
	if (ret)
		goto err_lock;
	return 0;

err_lock:
	pvt_bus_destroy(&machine->msr);
err_msr:
	pvt_bus_destroy(&machine->mmio);
err_mmio:
	pvt_bus_destroy(&machine->pio);
	return ret;
}

void pvt_machine_destroy(struct pvt_machine *machine)
{
	pthread_mutex_destroy(&machine->ring_lock);
	pvt_bus_destroy(&machine->msr);
	pvt_bus_destroy(&machine->mmio);
	pvt_bus_destroy(&machine->pio);
}
