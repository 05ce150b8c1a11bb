/* SPDX-License-Identifier: MIT */
/*
 * The PC keyboard controller (i8042) without a keyboard: the status and
 * command port 0x64, the data port 0x60, the controller commands a kernel
 * sends while probing (read/write the command byte, self-tests, enable and
 * disable the ports), and the reset line: command 0xfe, or clearing bit 0 of
 * the output port with 0xd1, stops the run with PVT_I8042_STOP_RESET.
 */
#ifndef PVT_I8042_H
#define PVT_I8042_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

#define PVT_I8042_DATA_PORT 0x60
#define PVT_I8042_COMMAND_PORT 0x64
#define PVT_I8042_PORT_COUNT 1 /* each of the two */
#define PVT_I8042_CMD_PULSE_RESET 0xfe /* to the command port: reset the CPU */
#define PVT_I8042_STOP_RESET 0xfe /* stop_code of a reset */

struct pvt_i8042 {
	pthread_mutex_t lock;
	uint8_t command_byte;
	uint8_t output;       /* byte waiting for the guest at 0x60 */
	bool output_full;
	uint8_t pending;      /* command waiting for its data byte, 0 if none */
	bool last_was_command;
	uint8_t output_port;
};

/* What a snapshot keeps: every register (the lock aside). */
struct pvt_i8042_state {
	uint8_t command_byte, output, output_full, pending, last_was_command;
	uint8_t output_port;
};

int pvt_i8042_init(struct pvt_i8042 *kbc);
void pvt_i8042_save(struct pvt_i8042 *kbc, struct pvt_i8042_state *state);
void pvt_i8042_load(struct pvt_i8042 *kbc, const struct pvt_i8042_state *state);
void pvt_i8042_destroy(struct pvt_i8042 *kbc);
/* For 0x60 (data). */
int pvt_i8042_data_io(void *opaque, uint64_t offset, uint8_t *data,
		      uint32_t len, bool is_write, uint64_t *stop_code);
/* For 0x64 (status on read, command on write). */
int pvt_i8042_command_io(void *opaque, uint64_t offset, uint8_t *data,
			 uint32_t len, bool is_write, uint64_t *stop_code);

#endif
