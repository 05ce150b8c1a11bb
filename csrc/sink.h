/* SPDX-License-Identifier: MIT */
/*
 * Where a character device's guest output goes: the last part of it is kept
 * in memory for console.output (a ring of at most `limit` bytes), and all of
 * it is optionally streamed to a file descriptor as it comes.
 */
#ifndef PVT_SINK_H
#define PVT_SINK_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

/* A limit that never drops anything. */
#define PVT_SINK_UNLIMITED SIZE_MAX
/* What a new sink keeps: the last MiB, which is plenty for a boot log. */
#define PVT_SINK_DEFAULT_LIMIT ((size_t)1 << 20)

struct pvt_sink {
	pthread_mutex_t lock;
	/*
	 * The kept output: len bytes from data[start], wrapping at capacity.
	 * The ring grows on demand up to limit and only wraps once it has
	 * reached it, so while capacity < limit, start is 0.
	 */
	uint8_t *data;
	size_t start;
	size_t len;
	size_t capacity;
	size_t limit;     /* most bytes kept; older ones are dropped */
	uint64_t dropped; /* bytes written since the last clear but not kept */
	int stream_fd;    /* the sink's own duplicate; -1: capture only */
	int stream_errno; /* first write error on stream_fd, 0 if none */
};

/* An empty sink keeping PVT_SINK_DEFAULT_LIMIT bytes, streaming nowhere. */
int pvt_sink_init(struct pvt_sink *sink);
/* Frees the buffer and closes the stream's descriptor. */
void pvt_sink_destroy(struct pvt_sink *sink);
/* Streams then keeps n bytes; 0 or -ENOMEM (the stream got them even so). */
int pvt_sink_put(struct pvt_sink *sink, const uint8_t *bytes, size_t n);
/*
 * Streams output from now on to a duplicate of fd (-1: stop), so the caller
 * may close fd; the previous duplicate is closed.  0 or -errno (-EBADF: fd
 * is not open), in which case the stream is unchanged.
 */
int pvt_sink_set_stream(struct pvt_sink *sink, int fd);
/* Keeps at most limit bytes from now on, dropping the oldest; 0 or -ENOMEM. */
int pvt_sink_set_limit(struct pvt_sink *sink, size_t limit);
/*
 * Copies up to cap kept bytes, oldest first, starting offset bytes in;
 * returns how many bytes are kept.
 */
size_t pvt_sink_copy(struct pvt_sink *sink, size_t offset, uint8_t *out,
		     size_t cap);
uint64_t pvt_sink_dropped(struct pvt_sink *sink);
/* Forgets the kept output (and frees its buffer) and the dropped count. */
void pvt_sink_clear(struct pvt_sink *sink);
/*
 * Makes the kept output these bytes (restoring a snapshot), or their last
 * limit bytes; they are not streamed.  0 or -ENOMEM (output unchanged).
 */
int pvt_sink_replace(struct pvt_sink *sink, const uint8_t *bytes, size_t n);

#endif
