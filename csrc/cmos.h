/* SPDX-License-Identifier: MIT */
/*
 * The PC's CMOS RAM and MC146818 real-time clock at ports 0x70 (index; bit
 * 7 is the NMI mask) and 0x71 (data).  The clock reads the host's UTC time
 * plus an offset the guest sets by writing the time registers, in BCD or
 * binary and 12- or 24-hour form as status register B says.  The memory-size
 * bytes are those a PC BIOS (and QEMU) leave for the OS.
 */
#ifndef PVT_CMOS_H
#define PVT_CMOS_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <time.h>

#define PVT_CMOS_PORT 0x70
#define PVT_CMOS_PORT_COUNT 2
#define PVT_CMOS_SIZE 128

/* Register indices. */
#define PVT_CMOS_SECONDS 0x00
#define PVT_CMOS_MINUTES 0x02
#define PVT_CMOS_HOURS 0x04
#define PVT_CMOS_WEEKDAY 0x06
#define PVT_CMOS_DAY 0x07
#define PVT_CMOS_MONTH 0x08
#define PVT_CMOS_YEAR 0x09
#define PVT_CMOS_STATUS_A 0x0a
#define PVT_CMOS_STATUS_B 0x0b
#define PVT_CMOS_STATUS_C 0x0c
#define PVT_CMOS_STATUS_D 0x0d
#define PVT_CMOS_BASE_MEM_LO 0x15    /* KiB below 640K */
#define PVT_CMOS_EXT_MEM_LO 0x17     /* KiB from 1M, at most 65535 */
#define PVT_CMOS_EXT_MEM2_LO 0x30    /* the same, POST copy */
#define PVT_CMOS_CENTURY 0x32
#define PVT_CMOS_MEM_16M_LO 0x34     /* 64 KiB blocks from 16M to 4G */
#define PVT_CMOS_MEM_4G_LO 0x5b      /* 64 KiB blocks above 4G, 3 bytes */

struct pvt_cmos {
	pthread_mutex_t lock;
	uint8_t index;
	uint8_t ram[PVT_CMOS_SIZE];
	time_t offset; /* guest time minus host time, seconds */
};

/* What a snapshot keeps: the index register, the RAM and the clock offset. */
struct pvt_cmos_state {
	uint8_t index;
	uint8_t ram[PVT_CMOS_SIZE];
	int64_t offset;
};

int pvt_cmos_init(struct pvt_cmos *cmos);
void pvt_cmos_save(struct pvt_cmos *cmos, struct pvt_cmos_state *state);
void pvt_cmos_load(struct pvt_cmos *cmos, const struct pvt_cmos_state *state);
void pvt_cmos_destroy(struct pvt_cmos *cmos);
int pvt_cmos_io(void *opaque, uint64_t offset, uint8_t *data, uint32_t len,
		bool is_write, uint64_t *stop_code);

/* Fills in the memory-size bytes for RAM below and above 4 GiB. */
void pvt_cmos_set_memory(struct pvt_cmos *cmos, uint64_t below_4g,
			 uint64_t above_4g);

/* Reads or writes a byte as the guest would (clock registers included). */
uint8_t pvt_cmos_read(struct pvt_cmos *cmos, uint8_t index);
void pvt_cmos_write(struct pvt_cmos *cmos, uint8_t index, uint8_t value);

#endif
