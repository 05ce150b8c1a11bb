// SPDX-License-Identifier: MIT
#include "debugcon.h"

int pvt_debugcon_io(void *opaque, uint64_t offset, uint8_t *data,
		    uint32_t len, bool is_write, uint64_t *stop_code)
{
	struct pvt_sink *output = opaque;
	uint32_t i;

	(void)offset;
	(void)stop_code;
	if (is_write)
		return pvt_sink_put(output, data, 1); /* QEMU keeps the low byte */
	for (i = 0; i < len; i++)
		data[i] = PVT_DEBUGCON_READBACK;
	return 0;
}
