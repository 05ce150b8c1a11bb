// SPDX-License-Identifier: MIT
#include "i8042.h"

#include <string.h>

#include "iobus.h"

#define STATUS_OUTPUT_FULL 0x01
#define STATUS_SYSTEM 0x04    /* self-test passed */
#define STATUS_COMMAND 0x08   /* the last write went to 0x64 */
#define STATUS_UNLOCKED 0x10  /* keyboard not inhibited */

#define CMD_READ_COMMAND_BYTE 0x20
#define CMD_WRITE_COMMAND_BYTE 0x60
#define CMD_DISABLE_AUX 0xa7
#define CMD_ENABLE_AUX 0xa8
#define CMD_TEST_AUX 0xa9
#define CMD_SELF_TEST 0xaa
#define CMD_TEST_KBD 0xab
#define CMD_DISABLE_KBD 0xad
#define CMD_ENABLE_KBD 0xae
#define CMD_READ_OUTPUT_PORT 0xd0
#define CMD_WRITE_OUTPUT_PORT 0xd1

#define CB_SYSTEM 0x04
#define CB_KBD_DISABLED 0x10
#define CB_AUX_DISABLED 0x20
#define CB_TRANSLATE 0x40

#define SELF_TEST_OK 0x55
#define PORT_TEST_OK 0x00
#define OUTPUT_PORT_RESET_LINE 0x01 /* 0: reset asserted */
#define OUTPUT_PORT_A20 0x02

int pvt_i8042_init(struct pvt_i8042 *kbc)
{
	memset(kbc, 0, sizeof(*kbc));
	kbc->command_byte = CB_SYSTEM | CB_TRANSLATE;
	kbc->output_port = OUTPUT_PORT_RESET_LINE | OUTPUT_PORT_A20;
	return -pthread_mutex_init(&kbc->lock, NULL);
}

void pvt_i8042_destroy(struct pvt_i8042 *kbc)
{
	pthread_mutex_destroy(&kbc->lock);
}

static void reply(struct pvt_i8042 *kbc, uint8_t value)
{
	kbc->output = value;
	kbc->output_full = true;
}

/* Returns PVT_DEV_STOP when the command resets the machine. */
static int command(struct pvt_i8042 *kbc, uint8_t cmd)
{
	switch (cmd) {
	case CMD_READ_COMMAND_BYTE:
		reply(kbc, kbc->command_byte);
		break;
	case CMD_WRITE_COMMAND_BYTE:
	case CMD_WRITE_OUTPUT_PORT:
		kbc->pending = cmd;
		break;
	case CMD_DISABLE_AUX:
		kbc->command_byte |= CB_AUX_DISABLED;
		break;
	case CMD_ENABLE_AUX:
		kbc->command_byte &= ~CB_AUX_DISABLED;
		break;
	case CMD_TEST_AUX:
	case CMD_TEST_KBD:
		reply(kbc, PORT_TEST_OK);
		break;
	case CMD_SELF_TEST:
		reply(kbc, SELF_TEST_OK);
		break;
	case CMD_DISABLE_KBD:
		kbc->command_byte |= CB_KBD_DISABLED;
		break;
	case CMD_ENABLE_KBD:
		kbc->command_byte &= ~CB_KBD_DISABLED;
		break;
	case CMD_READ_OUTPUT_PORT:
		reply(kbc, kbc->output_port);
		break;
	case PVT_I8042_CMD_PULSE_RESET:
		return PVT_DEV_STOP;
	default:
		break; /* other commands (pulse lines 0xf0-0xfd...) do nothing */
	}
	return 0;
}

int pvt_i8042_command_io(void *opaque, uint64_t offset, uint8_t *data,
			 uint32_t len, bool is_write, uint64_t *stop_code)
{
	struct pvt_i8042 *kbc = opaque;
	int ret = 0;

	(void)offset;
	pthread_mutex_lock(&kbc->lock);
	if (is_write) {
		kbc->last_was_command = true;
		kbc->pending = 0;
		ret = command(kbc, data[0]);
		if (ret == PVT_DEV_STOP)
			*stop_code = PVT_I8042_STOP_RESET;
	} else {
		memset(data, 0, len);
		data[0] = STATUS_UNLOCKED |
			  (kbc->command_byte & CB_SYSTEM ? STATUS_SYSTEM : 0) |
			  (kbc->last_was_command ? STATUS_COMMAND : 0) |
			  (kbc->output_full ? STATUS_OUTPUT_FULL : 0);
	}
	pthread_mutex_unlock(&kbc->lock);
	return ret;
}

int pvt_i8042_data_io(void *opaque, uint64_t offset, uint8_t *data,
		      uint32_t len, bool is_write, uint64_t *stop_code)
{
	struct pvt_i8042 *kbc = opaque;
	int ret = 0;

	(void)offset;
	pthread_mutex_lock(&kbc->lock);
	if (!is_write) {
		memset(data, 0, len);
		data[0] = kbc->output;
		kbc->output_full = false;
		goto out;
	}
	kbc->last_was_command = false;
	switch (kbc->pending) {
	case CMD_WRITE_COMMAND_BYTE:
		kbc->command_byte = data[0];
		break;
	case CMD_WRITE_OUTPUT_PORT:
		kbc->output_port = data[0];
		if (!(data[0] & OUTPUT_PORT_RESET_LINE)) {
			*stop_code = PVT_I8042_STOP_RESET;
			ret = PVT_DEV_STOP;
		}
		break;
	default:
		break; /* bytes for a keyboard that is not there */
	}
	kbc->pending = 0;
out:
	pthread_mutex_unlock(&kbc->lock);
	return ret;
}

void pvt_i8042_save(struct pvt_i8042 *kbc, struct pvt_i8042_state *state)
{
	memset(state, 0, sizeof(*state));
	pthread_mutex_lock(&kbc->lock);
	state->command_byte = kbc->command_byte;
	state->output = kbc->output;
	state->output_full = kbc->output_full;
	state->pending = kbc->pending;
	state->last_was_command = kbc->last_was_command;
	state->output_port = kbc->output_port;
	pthread_mutex_unlock(&kbc->lock);
}

void pvt_i8042_load(struct pvt_i8042 *kbc, const struct pvt_i8042_state *state)
{
	pthread_mutex_lock(&kbc->lock);
	kbc->command_byte = state->command_byte;
	kbc->output = state->output;
	kbc->output_full = state->output_full != 0;
	kbc->pending = state->pending;
	kbc->last_was_command = state->last_was_command != 0;
	kbc->output_port = state->output_port;
	pthread_mutex_unlock(&kbc->lock);
}
