/* SPDX-License-Identifier: MIT */
/*
 * Where a character device's guest output goes: kept in memory for
 * console.output, and optionally streamed to a file descriptor as it comes.
 */
#ifndef PVT_SINK_H
#define PVT_SINK_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

struct pvt_sink {
	pthread_mutex_t lock;
	uint8_t *data;
	size_t len;
	size_t capacity;
	size_t streamed;  /* bytes of data already written to stream_fd */
	int stream_fd;    /* -1: capture only */
	int stream_errno; /* first write error on stream_fd, 0 if none */
};

int pvt_sink_init(struct pvt_sink *sink);
void pvt_sink_destroy(struct pvt_sink *sink);
int pvt_sink_put(struct pvt_sink *sink, const uint8_t *bytes, size_t n);
void pvt_sink_set_stream(struct pvt_sink *sink, int fd);
/* Copies up to cap bytes starting at offset; returns the total length. */
size_t pvt_sink_copy(struct pvt_sink *sink, size_t offset, uint8_t *out,
		     size_t cap);
void pvt_sink_clear(struct pvt_sink *sink);
/* Makes the captured output exactly these bytes (restoring a snapshot). */
int pvt_sink_replace(struct pvt_sink *sink, const uint8_t *bytes, size_t n);

#endif
