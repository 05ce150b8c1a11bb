// SPDX-License-Identifier: MIT
#include "debug_exit.h"

#include "iobus.h"

int pvt_debug_exit_io(void *opaque, uint64_t offset, uint8_t *data,
		      uint32_t len, bool is_write, uint64_t *stop_code)
{
	uint64_t value = 0;
	uint32_t i;

	(void)opaque;
	if (!is_write) {
		for (i = 0; i < len; i++)
			data[i] = 0xff;
		return 0;
	}
	if (offset != 0)
		return 0; /* only a write at the port itself counts */
	for (i = 0; i < len && i < sizeof(value); i++)
		value |= (uint64_t)data[i] << (8 * i);
	*stop_code = value;
	return PVT_DEV_STOP;
}
