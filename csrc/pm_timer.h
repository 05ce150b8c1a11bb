/* SPDX-License-Identifier: MIT */
/*
 * The ACPI power-management timer: a free-running 32-bit counter at
 * 3.579545 MHz (FADT TMR_VAL_EXT set), read from one 32-bit port.  It
 * counts CLOCK_MONOTONIC from the device's creation, so it never goes back
 * and all vCPUs see the same value.
 */
#ifndef PVT_PM_TIMER_H
#define PVT_PM_TIMER_H

#include <stdbool.h>
#include <stdint.h>

#define PVT_PM_TIMER_PORT 0x608 /* PM base 0x600 + 8, as on QEMU's q35 */
#define PVT_PM_TIMER_PORT_COUNT 4
#define PVT_PM_TIMER_HZ 3579545ULL

struct pvt_pm_timer {
	uint64_t start_ns; /* CLOCK_MONOTONIC at tick 0 */
};

int pvt_pm_timer_init(struct pvt_pm_timer *timer);
int pvt_pm_timer_io(void *opaque, uint64_t offset, uint8_t *data, uint32_t len,
		    bool is_write, uint64_t *stop_code);
/* The counter now (all 32 bits). */
uint32_t pvt_pm_timer_value(struct pvt_pm_timer *timer);

#endif
