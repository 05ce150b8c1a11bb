// SPDX-License-Identifier: MIT
#include "acpi_pm1.h"

#include "iobus.h"

/* The three 16-bit registers as the guest sees them, byte by byte. */
static uint16_t *pm1_register(struct pvt_acpi_pm1 *pm, uint64_t offset)
{
	switch (offset / 2) {
	case 0:
		return &pm->status;
	case 1:
		return &pm->enable;
	default:
		return &pm->control;
	}
}

static uint8_t pm1_read_byte(struct pvt_acpi_pm1 *pm, uint64_t offset)
{
	uint16_t value = __atomic_load_n(pm1_register(pm, offset), __ATOMIC_RELAXED);

	if (offset / 2 == 2)
		value |= PVT_PM1_CNT_SCI_EN;
	return (uint8_t)(value >> (8 * (offset % 2)));
}

/* One byte written; returns the stop code of a sleep it starts, or 0. */
static int pm1_write_byte(struct pvt_acpi_pm1 *pm, uint64_t offset, uint8_t byte)
{
	uint16_t bits = (uint16_t)(byte << (8 * (offset % 2)));
	uint16_t keep = (uint16_t)(0xff00u >> (8 * (offset % 2)));
	uint16_t *reg = pm1_register(pm, offset);
	uint16_t old, value;

	switch (offset / 2) {
	case 0: /* write 1 to clear */
		__atomic_fetch_and(reg, (uint16_t)~bits, __ATOMIC_RELAXED);
		return 0;
	case 1:
		old = __atomic_load_n(reg, __ATOMIC_RELAXED);
		__atomic_store_n(reg, (uint16_t)((old & keep) | bits), __ATOMIC_RELAXED);
		return 0;
	default:
		old = __atomic_load_n(reg, __ATOMIC_RELAXED);
		value = (uint16_t)((old & keep) | bits);
		__atomic_store_n(reg, (uint16_t)(value & ~PVT_PM1_CNT_SLP_EN),
				 __ATOMIC_RELAXED);
		if (!(bits & PVT_PM1_CNT_SLP_EN))
			return 0;
		switch ((value & PVT_PM1_CNT_SLP_TYP_MASK) >> PVT_PM1_CNT_SLP_TYP_SHIFT) {
		case PVT_PM1_SLP_TYP_S5:
			return PVT_PM1_STOP_POWEROFF;
		case PVT_PM1_SLP_TYP_S3:
			return PVT_PM1_STOP_SUSPEND;
		default:
			__atomic_fetch_or(&pm->status, (uint16_t)PVT_PM1_STS_WAK,
					  __ATOMIC_RELAXED);
			return 0;
		}
	}
}

int pvt_acpi_pm1_io(void *opaque, uint64_t offset, uint8_t *data, uint32_t len,
		    bool is_write, uint64_t *stop_code)
{
	struct pvt_acpi_pm1 *pm = opaque;
	int sleep = 0;
	uint32_t i;

	for (i = 0; i < len; i++) {
		uint64_t at = offset + i;

		if (at >= PVT_PM1_PORT_COUNT) {
			if (!is_write)
				data[i] = 0xff;
			continue;
		}
		if (is_write) {
			int code = pm1_write_byte(pm, at, data[i]);

			if (code)
				sleep = code;
		} else {
			data[i] = pm1_read_byte(pm, at);
		}
	}
	if (sleep) {
		*stop_code = (uint64_t)sleep;
		return PVT_DEV_STOP;
	}
	return 0;
}
