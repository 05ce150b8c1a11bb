/* SPDX-License-Identifier: MIT */
/*
 * The ACPI PM1a event and control blocks (the FADT's PM1a_EVT_BLK and
 * PM1a_CNT_BLK), beside the PM timer at 0x608 as on QEMU's q35:
 *   0x600  PM1_STS (16 bits, write 1 to clear)
 *   0x602  PM1_EN  (16 bits)
 *   0x604  PM1_CNT (16 bits): SCI_EN reads 1 (the machine is in ACPI mode
 *          from the start: the FADT has no SMI_CMD), SLP_TYP in bits 10-12,
 *          SLP_EN (bit 13, write-only) starts the sleep.
 * Sleeping in S5 (SLP_TYP PVT_PM1_SLP_TYP_S5 with SLP_EN) stops the run with
 * PVT_PM1_STOP_POWEROFF, in S3 (PVT_PM1_SLP_TYP_S3) with
 * PVT_PM1_STOP_SUSPEND: the VMM waits for the wake-up event and restarts
 * the CPUs at the FACS waking vector (pyvt/acpi_sleep.py).  Other sleep
 * types are not offered (the DSDT has \_S3 and \_S5 only): the write sets
 * WAK_STS at once, as a sleep that woke up.
 */
#ifndef PVT_ACPI_PM1_H
#define PVT_ACPI_PM1_H

#include <stdbool.h>
#include <stdint.h>

#define PVT_PM1_PORT 0x600
#define PVT_PM1_PORT_COUNT 6
#define PVT_PM1_EVENT_LENGTH 4   /* PM1_STS + PM1_EN */
#define PVT_PM1_CONTROL_LENGTH 2 /* PM1_CNT */
#define PVT_PM1_SLP_TYP_S5 0
#define PVT_PM1_SLP_TYP_S3 1
#define PVT_PM1_STOP_POWEROFF 5 /* stop_code of a power-off */
#define PVT_PM1_STOP_SUSPEND 3  /* stop_code of a suspend to RAM */

#define PVT_PM1_STS_WAK (1u << 15)
#define PVT_PM1_STS_RTC (1u << 10)
#define PVT_PM1_EN_RTC (1u << 10)
#define PVT_PM1_CNT_SCI_EN (1u << 0)
#define PVT_PM1_CNT_SLP_TYP_SHIFT 10
#define PVT_PM1_CNT_SLP_TYP_MASK (7u << 10)
#define PVT_PM1_CNT_SLP_EN (1u << 13)

struct pvt_acpi_pm1 {
	uint16_t status;
	uint16_t enable;
	uint16_t control; /* without SLP_EN */
};

int pvt_acpi_pm1_io(void *opaque, uint64_t offset, uint8_t *data, uint32_t len,
		    bool is_write, uint64_t *stop_code);

#endif
