// SPDX-License-Identifier: MIT
#include "pm_timer.h"

#include <errno.h>
#include <time.h>

static int monotonic_ns(uint64_t *ns)
{
	struct timespec ts;

	if (clock_gettime(CLOCK_MONOTONIC, &ts))
		return -errno;
	*ns = (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
	return 0;
}

int pvt_pm_timer_init(struct pvt_pm_timer *timer)
{
	return monotonic_ns(&timer->start_ns);
}

uint32_t pvt_pm_timer_value(struct pvt_pm_timer *timer)
{
	uint64_t now = 0, elapsed;

	if (monotonic_ns(&now))
		return 0;
	elapsed = now - timer->start_ns;
	/* Split so that ns * HZ cannot overflow 64 bits. */
	return (uint32_t)((elapsed / 1000000000ULL) * PVT_PM_TIMER_HZ +
			  (elapsed % 1000000000ULL) * PVT_PM_TIMER_HZ /
				  1000000000ULL);
}

int pvt_pm_timer_io(void *opaque, uint64_t offset, uint8_t *data, uint32_t len,
		    bool is_write, uint64_t *stop_code)
{
	uint32_t value;
	uint32_t i;

	(void)stop_code;
	if (is_write)
		return 0; /* the counter is read-only */
	value = pvt_pm_timer_value(opaque);
	for (i = 0; i < len; i++) {
		uint64_t byte = offset + i;

		data[i] = byte < 4 ? (uint8_t)(value >> (8 * byte)) : 0xff;
	}
	return 0;
}
