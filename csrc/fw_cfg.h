/* SPDX-License-Identifier: MIT */
/*
 * QEMU's fw_cfg, the traditional I/O-port interface: a guest writes a 16-bit
 * key to the selector port (0x510) and reads the item byte by byte from the
 * data port (0x511).  Items are byte strings set by the host; named files
 * get keys from PVT_FW_CFG_FILE_FIRST on and are listed, sorted by name, in
 * the big-endian directory at PVT_FW_CFG_FILE_DIR, exactly as QEMU lays it
 * out.  No DMA interface: PVT_FW_CFG_ID reads as 1 (traditional only).
 */
#ifndef PVT_FW_CFG_H
#define PVT_FW_CFG_H

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define PVT_FW_CFG_PORT 0x510
#define PVT_FW_CFG_PORT_COUNT 2 /* selector, data */

#define PVT_FW_CFG_SIGNATURE 0x0000
#define PVT_FW_CFG_ID 0x0001
#define PVT_FW_CFG_RAM_SIZE 0x0003
#define PVT_FW_CFG_NB_CPUS 0x0005
#define PVT_FW_CFG_MAX_CPUS 0x000f
#define PVT_FW_CFG_FILE_DIR 0x0019
#define PVT_FW_CFG_FILE_FIRST 0x0020
#define PVT_FW_CFG_KEY_COUNT 0x4000 /* keys are 14 bits; 0x4000/0x8000 are flags */
#define PVT_FW_CFG_NAME_SIZE 56     /* a file name, NUL included */

struct pvt_fw_cfg_item {
	uint8_t *data;
	uint32_t len;
};

struct pvt_fw_cfg_file {
	char name[PVT_FW_CFG_NAME_SIZE];
	uint16_t key;
	struct pvt_fw_cfg_item item;
};

struct pvt_fw_cfg {
	pthread_mutex_t lock;
	uint16_t selector;
	uint32_t offset;
	/* Keys below PVT_FW_CFG_FILE_FIRST; files hold their own items. */
	struct pvt_fw_cfg_item items[PVT_FW_CFG_FILE_FIRST];
	struct pvt_fw_cfg_file *files; /* sorted by name */
	uint32_t file_count;
};

int pvt_fw_cfg_init(struct pvt_fw_cfg *fw);
void pvt_fw_cfg_destroy(struct pvt_fw_cfg *fw);
int pvt_fw_cfg_io(void *opaque, uint64_t offset, uint8_t *data, uint32_t len,
		  bool is_write, uint64_t *stop_code);

/*
 * Sets item key (below PVT_FW_CFG_FILE_FIRST) to a copy of data.  -EINVAL
 * for a file key or one the device owns (signature, ID, file directory).
 */
int pvt_fw_cfg_set(struct pvt_fw_cfg *fw, uint16_t key, const uint8_t *data,
		   uint32_t len);
int pvt_fw_cfg_set_u16(struct pvt_fw_cfg *fw, uint16_t key, uint16_t value);
int pvt_fw_cfg_set_u64(struct pvt_fw_cfg *fw, uint16_t key, uint64_t value);

/*
 * Adds (or replaces) the file called name; returns its key (> 0), -EINVAL
 * for an empty or too long name, -ENOSPC when no key is left, -ENOMEM.
 */
int pvt_fw_cfg_add_file(struct pvt_fw_cfg *fw, const char *name,
			const uint8_t *data, uint32_t len);

/* The guest's read position: selected key and offset in it (for snapshots). */
void pvt_fw_cfg_get_position(struct pvt_fw_cfg *fw, uint16_t *selector,
			     uint32_t *offset);
void pvt_fw_cfg_set_position(struct pvt_fw_cfg *fw, uint16_t selector,
			     uint32_t offset);

/* Copies up to cap bytes of item key into out; returns its length, -ENOENT. */
int64_t pvt_fw_cfg_get(struct pvt_fw_cfg *fw, uint16_t key, uint8_t *out,
		       uint32_t cap);

#endif
