// SPDX-License-Identifier: MIT
#include "fw_cfg.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#define FW_CFG_SELECTOR 0
#define FW_CFG_DATA 1
#define FW_CFG_KEY_MASK 0x3fff
#define FW_CFG_ID_TRADITIONAL 0x1
#define FW_CFG_DIR_ENTRY_SIZE (4 + 2 + 2 + PVT_FW_CFG_NAME_SIZE)

static int set_item(struct pvt_fw_cfg_item *item, const uint8_t *data,
		    uint32_t len)
{
	uint8_t *copy = NULL;

	if (len) {
		copy = malloc(len);
		if (!copy)
			return -ENOMEM;
		memcpy(copy, data, len);
	}
	free(item->data);
	item->data = copy;
	item->len = len;
	return 0;
}

/* The item the guest reads for key, or NULL. */
static struct pvt_fw_cfg_item *find_item(struct pvt_fw_cfg *fw, uint16_t key)
{
	uint32_t i;

	if (key < PVT_FW_CFG_FILE_FIRST)
		return &fw->items[key];
	for (i = 0; i < fw->file_count; i++)
		if (fw->files[i].key == key)
			return &fw->files[i].item;
	return NULL;
}

static void put_be32(uint8_t *p, uint32_t v)
{
	p[0] = v >> 24;
	p[1] = v >> 16;
	p[2] = v >> 8;
	p[3] = v;
}

static int rebuild_directory(struct pvt_fw_cfg *fw)
{
	uint32_t len = 4 + fw->file_count * FW_CFG_DIR_ENTRY_SIZE;
	uint8_t *dir = calloc(1, len);
	uint32_t i;

	if (!dir)
		return -ENOMEM;
	put_be32(dir, fw->file_count);
	for (i = 0; i < fw->file_count; i++) {
		uint8_t *entry = dir + 4 + i * FW_CFG_DIR_ENTRY_SIZE;
		uint16_t key = fw->files[i].key;

		put_be32(entry, fw->files[i].item.len);
		entry[4] = key >> 8;
		entry[5] = key;
		memcpy(entry + 8, fw->files[i].name, PVT_FW_CFG_NAME_SIZE);
	}
	free(fw->items[PVT_FW_CFG_FILE_DIR].data);
	fw->items[PVT_FW_CFG_FILE_DIR].data = dir;
	fw->items[PVT_FW_CFG_FILE_DIR].len = len;
	return 0;
}

int pvt_fw_cfg_init(struct pvt_fw_cfg *fw)
{
	static const uint8_t signature[4] = { 'Q', 'E', 'M', 'U' };
	static const uint8_t id[4] = { FW_CFG_ID_TRADITIONAL, 0, 0, 0 };
	int ret;

	memset(fw, 0, sizeof(*fw));
	ret = -pthread_mutex_init(&fw->lock, NULL);
	if (ret)
		return ret;
	ret = set_item(&fw->items[PVT_FW_CFG_SIGNATURE], signature,
		       sizeof(signature));
	if (!ret)
		ret = set_item(&fw->items[PVT_FW_CFG_ID], id, sizeof(id));
	if (!ret)
		ret = rebuild_directory(fw);
	if (ret)
		pvt_fw_cfg_destroy(fw);
	return ret;
}

void pvt_fw_cfg_destroy(struct pvt_fw_cfg *fw)
{
	uint32_t key;

	for (key = 0; key < PVT_FW_CFG_FILE_FIRST; key++) {
		free(fw->items[key].data);
		fw->items[key].data = NULL;
	}
	for (key = 0; key < fw->file_count; key++)
		free(fw->files[key].item.data);
	free(fw->files);
	fw->files = NULL;
	fw->file_count = 0;
	pthread_mutex_destroy(&fw->lock);
}

static bool device_owned(uint16_t key)
{
	return key == PVT_FW_CFG_SIGNATURE || key == PVT_FW_CFG_ID ||
	       key == PVT_FW_CFG_FILE_DIR;
}

int pvt_fw_cfg_set(struct pvt_fw_cfg *fw, uint16_t key, const uint8_t *data,
		   uint32_t len)
{
	int ret;

	if (key >= PVT_FW_CFG_FILE_FIRST || device_owned(key))
		return -EINVAL;
	pthread_mutex_lock(&fw->lock);
	ret = set_item(&fw->items[key], data, len);
	pthread_mutex_unlock(&fw->lock);
	return ret;
}

int pvt_fw_cfg_set_u16(struct pvt_fw_cfg *fw, uint16_t key, uint16_t value)
{
	uint8_t le[2] = { value, value >> 8 };

	return pvt_fw_cfg_set(fw, key, le, sizeof(le));
}

int pvt_fw_cfg_set_u64(struct pvt_fw_cfg *fw, uint16_t key, uint64_t value)
{
	uint8_t le[8];
	int i;

	for (i = 0; i < 8; i++)
		le[i] = value >> (8 * i);
	return pvt_fw_cfg_set(fw, key, le, sizeof(le));
}

static uint16_t next_free_key(struct pvt_fw_cfg *fw)
{
	uint32_t key;
	uint32_t i;

	for (key = PVT_FW_CFG_FILE_FIRST; key < PVT_FW_CFG_KEY_COUNT; key++) {
		bool used = false;

		for (i = 0; i < fw->file_count && !used; i++)
			used = fw->files[i].key == key;
		if (!used)
			return key;
	}
	return 0;
}

int pvt_fw_cfg_add_file(struct pvt_fw_cfg *fw, const char *name,
			const uint8_t *data, uint32_t len)
{
	struct pvt_fw_cfg_file *files;
	size_t name_len = strlen(name);
	uint32_t at, i;
	uint16_t key;
	int ret;

	if (!name_len || name_len >= PVT_FW_CFG_NAME_SIZE)
		return -EINVAL;
	pthread_mutex_lock(&fw->lock);
	for (at = 0; at < fw->file_count; at++) {
		int order = strcmp(name, fw->files[at].name);

		if (order == 0) {
			key = fw->files[at].key;
			ret = set_item(&fw->files[at].item, data, len);
			goto out_rebuild;
		}
		if (order < 0)
			break;
	}
	key = next_free_key(fw);
	if (!key) {
		ret = -ENOSPC;
		goto out;
	}
	files = realloc(fw->files, (fw->file_count + 1) * sizeof(*files));
	if (!files) {
		ret = -ENOMEM;
		goto out;
	}
	fw->files = files;
	for (i = fw->file_count; i > at; i--)
		files[i] = files[i - 1];
	memset(&files[at], 0, sizeof(files[at]));
	memcpy(files[at].name, name, name_len);
	files[at].key = key;
	ret = set_item(&files[at].item, data, len);
	if (ret) {
		for (i = at; i < fw->file_count; i++)
			files[i] = files[i + 1];
		goto out;
	}
	fw->file_count++;
out_rebuild:
	if (!ret)
		ret = rebuild_directory(fw);
out:
	pthread_mutex_unlock(&fw->lock);
	return ret ? ret : key;
}

int64_t pvt_fw_cfg_get(struct pvt_fw_cfg *fw, uint16_t key, uint8_t *out,
		       uint32_t cap)
{
	struct pvt_fw_cfg_item *item;
	int64_t len = -ENOENT;

	pthread_mutex_lock(&fw->lock);
	item = find_item(fw, key);
	if (item) {
		len = item->len;
		if (out && cap && item->len)
			memcpy(out, item->data, item->len < cap ? item->len : cap);
	}
	pthread_mutex_unlock(&fw->lock);
	return len;
}

int pvt_fw_cfg_io(void *opaque, uint64_t offset, uint8_t *data, uint32_t len,
		  bool is_write, uint64_t *stop_code)
{
	struct pvt_fw_cfg *fw = opaque;
	struct pvt_fw_cfg_item *item;
	uint32_t i;

	(void)stop_code;
	pthread_mutex_lock(&fw->lock);
	switch (offset) {
	case FW_CFG_SELECTOR:
		if (is_write) {
			fw->selector = (data[0] | (len > 1 ? data[1] << 8 : 0)) &
				       FW_CFG_KEY_MASK;
			fw->offset = 0;
		} else {
			memset(data, 0, len); /* the selector is write-only */
		}
		break;
	case FW_CFG_DATA:
		if (is_write)
			break; /* QEMU ignores data writes since 2.4 */
		item = find_item(fw, fw->selector);
		/* Past the end (or an unknown key) reads as zero. */
		for (i = 0; i < len; i++)
			data[i] = item && fw->offset < item->len ?
					  item->data[fw->offset++] :
					  0;
		break;
	}
	pthread_mutex_unlock(&fw->lock);
	return 0;
}

void pvt_fw_cfg_get_position(struct pvt_fw_cfg *fw, uint16_t *selector,
			     uint32_t *offset)
{
	pthread_mutex_lock(&fw->lock);
	*selector = fw->selector;
	*offset = fw->offset;
	pthread_mutex_unlock(&fw->lock);
}

void pvt_fw_cfg_set_position(struct pvt_fw_cfg *fw, uint16_t selector,
			     uint32_t offset)
{
	pthread_mutex_lock(&fw->lock);
	fw->selector = selector & FW_CFG_KEY_MASK;
	fw->offset = offset;
	pthread_mutex_unlock(&fw->lock);
}
