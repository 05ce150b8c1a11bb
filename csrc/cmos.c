// SPDX-License-Identifier: MIT
#include "cmos.h"

#include <errno.h>
#include <string.h>

#define CMOS_INDEX 0
#define CMOS_DATA 1
#define CMOS_INDEX_MASK 0x7f /* bit 7 masks NMI */

#define STATUS_A_DIVIDER 0x26 /* 32.768 kHz time base, 1024 Hz rate */
#define STATUS_A_UIP 0x80
#define STATUS_B_24H 0x02
#define STATUS_B_BINARY 0x04
#define STATUS_B_SET 0x80
#define STATUS_D_VALID 0x80
#define HOUR_PM 0x80

static uint8_t to_bcd(int v)
{
	return (uint8_t)(((v / 10) << 4) | (v % 10));
}

static int from_bcd(uint8_t v)
{
	return (v >> 4) * 10 + (v & 0x0f);
}

static void guest_time(struct pvt_cmos *cmos, struct tm *tm)
{
	time_t now = time(NULL) + cmos->offset;

	gmtime_r(&now, tm);
}

static uint8_t encode(struct pvt_cmos *cmos, int value)
{
	return cmos->ram[PVT_CMOS_STATUS_B] & STATUS_B_BINARY ? (uint8_t)value :
								to_bcd(value);
}

static int decode(struct pvt_cmos *cmos, uint8_t value)
{
	return cmos->ram[PVT_CMOS_STATUS_B] & STATUS_B_BINARY ? value :
								from_bcd(value);
}

static uint8_t read_hour(struct pvt_cmos *cmos, int hour)
{
	int h12;

	if (cmos->ram[PVT_CMOS_STATUS_B] & STATUS_B_24H)
		return encode(cmos, hour);
	h12 = hour % 12 ? hour % 12 : 12;
	return encode(cmos, h12) | (hour >= 12 ? HOUR_PM : 0);
}

static int write_hour(struct pvt_cmos *cmos, uint8_t value)
{
	int hour;

	if (cmos->ram[PVT_CMOS_STATUS_B] & STATUS_B_24H)
		return decode(cmos, value);
	hour = decode(cmos, value & ~HOUR_PM) % 12;
	return value & HOUR_PM ? hour + 12 : hour;
}

int pvt_cmos_init(struct pvt_cmos *cmos)
{
	memset(cmos, 0, sizeof(*cmos));
	cmos->ram[PVT_CMOS_STATUS_A] = STATUS_A_DIVIDER;
	cmos->ram[PVT_CMOS_STATUS_B] = STATUS_B_24H;
	return -pthread_mutex_init(&cmos->lock, NULL);
}

void pvt_cmos_destroy(struct pvt_cmos *cmos)
{
	pthread_mutex_destroy(&cmos->lock);
}

static void put_le(uint8_t *p, uint64_t value, int bytes)
{
	int i;

	for (i = 0; i < bytes; i++)
		p[i] = (uint8_t)(value >> (8 * i));
}

void pvt_cmos_set_memory(struct pvt_cmos *cmos, uint64_t below_4g,
			 uint64_t above_4g)
{
	uint64_t base_kib = below_4g >= 640 << 10 ? 640 : below_4g >> 10;
	uint64_t ext_kib = below_4g > 1 << 20 ? (below_4g - (1 << 20)) >> 10 : 0;
	uint64_t blocks_16m = below_4g > 16 << 20 ?
				      (below_4g - (16 << 20)) >> 16 : 0;
	uint64_t blocks_4g = above_4g >> 16;

	if (ext_kib > 0xffff)
		ext_kib = 0xffff;
	if (blocks_16m > 0xffff)
		blocks_16m = 0xffff;
	if (blocks_4g > 0xffffff)
		blocks_4g = 0xffffff;
	pthread_mutex_lock(&cmos->lock);
	put_le(&cmos->ram[PVT_CMOS_BASE_MEM_LO], base_kib, 2);
	put_le(&cmos->ram[PVT_CMOS_EXT_MEM_LO], ext_kib, 2);
	put_le(&cmos->ram[PVT_CMOS_EXT_MEM2_LO], ext_kib, 2);
	put_le(&cmos->ram[PVT_CMOS_MEM_16M_LO], blocks_16m, 2);
	put_le(&cmos->ram[PVT_CMOS_MEM_4G_LO], blocks_4g, 3);
	pthread_mutex_unlock(&cmos->lock);
}

static uint8_t cmos_read(struct pvt_cmos *cmos, uint8_t index)
{
	struct tm tm;

	switch (index) {
	case PVT_CMOS_SECONDS:
	case PVT_CMOS_MINUTES:
	case PVT_CMOS_HOURS:
	case PVT_CMOS_WEEKDAY:
	case PVT_CMOS_DAY:
	case PVT_CMOS_MONTH:
	case PVT_CMOS_YEAR:
	case PVT_CMOS_CENTURY:
		guest_time(cmos, &tm);
		switch (index) {
		case PVT_CMOS_SECONDS:
			return encode(cmos, tm.tm_sec);
		case PVT_CMOS_MINUTES:
			return encode(cmos, tm.tm_min);
		case PVT_CMOS_HOURS:
			return read_hour(cmos, tm.tm_hour);
		case PVT_CMOS_WEEKDAY:
			return encode(cmos, tm.tm_wday + 1);
		case PVT_CMOS_DAY:
			return encode(cmos, tm.tm_mday);
		case PVT_CMOS_MONTH:
			return encode(cmos, tm.tm_mon + 1);
		case PVT_CMOS_YEAR:
			return encode(cmos, tm.tm_year % 100);
		default:
			return encode(cmos, (tm.tm_year + 1900) / 100);
		}
	case PVT_CMOS_STATUS_A:
		/* The clock is read atomically: an update is never in progress. */
		return cmos->ram[PVT_CMOS_STATUS_A] & ~STATUS_A_UIP;
	case PVT_CMOS_STATUS_C:
		return 0; /* no interrupt flags pending (reading clears them) */
	case PVT_CMOS_STATUS_D:
		return STATUS_D_VALID; /* the battery is fine */
	default:
		return cmos->ram[index];
	}
}

static void cmos_write(struct pvt_cmos *cmos, uint8_t index, uint8_t value)
{
	struct tm tm;
	time_t now, wanted;

	switch (index) {
	case PVT_CMOS_SECONDS:
	case PVT_CMOS_MINUTES:
	case PVT_CMOS_HOURS:
	case PVT_CMOS_DAY:
	case PVT_CMOS_MONTH:
	case PVT_CMOS_YEAR:
	case PVT_CMOS_CENTURY:
		now = time(NULL);
		guest_time(cmos, &tm);
		switch (index) {
		case PVT_CMOS_SECONDS:
			tm.tm_sec = decode(cmos, value);
			break;
		case PVT_CMOS_MINUTES:
			tm.tm_min = decode(cmos, value);
			break;
		case PVT_CMOS_HOURS:
			tm.tm_hour = write_hour(cmos, value);
			break;
		case PVT_CMOS_DAY:
			tm.tm_mday = decode(cmos, value);
			break;
		case PVT_CMOS_MONTH:
			tm.tm_mon = decode(cmos, value) - 1;
			break;
		case PVT_CMOS_YEAR:
			tm.tm_year = (tm.tm_year + 1900) / 100 * 100 +
				     decode(cmos, value) - 1900;
			break;
		default:
			tm.tm_year = decode(cmos, value) * 100 +
				     (tm.tm_year + 1900) % 100 - 1900;
			break;
		}
		wanted = timegm(&tm);
		if (wanted != (time_t)-1)
			cmos->offset = wanted - now;
		break;
	case PVT_CMOS_WEEKDAY:
		break; /* derived from the date */
	case PVT_CMOS_STATUS_A:
		cmos->ram[index] = value & ~STATUS_A_UIP;
		break;
	case PVT_CMOS_STATUS_B:
		cmos->ram[index] = value & ~STATUS_B_SET;
		break;
	case PVT_CMOS_STATUS_C:
	case PVT_CMOS_STATUS_D:
		break; /* read-only */
	default:
		cmos->ram[index] = value;
	}
}

uint8_t pvt_cmos_read(struct pvt_cmos *cmos, uint8_t index)
{
	uint8_t value;

	pthread_mutex_lock(&cmos->lock);
	value = cmos_read(cmos, index & CMOS_INDEX_MASK);
	pthread_mutex_unlock(&cmos->lock);
	return value;
}

void pvt_cmos_write(struct pvt_cmos *cmos, uint8_t index, uint8_t value)
{
	pthread_mutex_lock(&cmos->lock);
	cmos_write(cmos, index & CMOS_INDEX_MASK, value);
	pthread_mutex_unlock(&cmos->lock);
}

int pvt_cmos_io(void *opaque, uint64_t offset, uint8_t *data, uint32_t len,
		bool is_write, uint64_t *stop_code)
{
	struct pvt_cmos *cmos = opaque;

	(void)stop_code;
	if (len != 1) {
		/* Wider accesses are not a PC's: ignore writes, read ones. */
		if (!is_write)
			memset(data, 0xff, len);
		return 0;
	}
	pthread_mutex_lock(&cmos->lock);
	if (offset == CMOS_INDEX) {
		if (is_write)
			cmos->index = data[0] & CMOS_INDEX_MASK;
		else
			data[0] = 0xff; /* the index register is write-only */
	} else if (is_write) {
		cmos_write(cmos, cmos->index, data[0]);
	} else {
		data[0] = cmos_read(cmos, cmos->index);
	}
	pthread_mutex_unlock(&cmos->lock);
	return 0;
}

void pvt_cmos_save(struct pvt_cmos *cmos, struct pvt_cmos_state *state)
{
	memset(state, 0, sizeof(*state));
	pthread_mutex_lock(&cmos->lock);
	state->index = cmos->index;
	memcpy(state->ram, cmos->ram, sizeof(state->ram));
	state->offset = (int64_t)cmos->offset;
	pthread_mutex_unlock(&cmos->lock);
}

void pvt_cmos_load(struct pvt_cmos *cmos, const struct pvt_cmos_state *state)
{
	pthread_mutex_lock(&cmos->lock);
	cmos->index = state->index & CMOS_INDEX_MASK;
	memcpy(cmos->ram, state->ram, sizeof(cmos->ram));
	cmos->offset = (time_t)state->offset;
	pthread_mutex_unlock(&cmos->lock);
}
