// SPDX-License-Identifier: MIT
#include "sink.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* The first allocation: most guests print less than this. */
#define SINK_FIRST_CAPACITY 4096

int pvt_sink_init(struct pvt_sink *sink)
{
	memset(sink, 0, sizeof(*sink));
	sink->limit = PVT_SINK_DEFAULT_LIMIT;
	sink->stream_fd = -1;
	return -pthread_mutex_init(&sink->lock, NULL);
}

void pvt_sink_destroy(struct pvt_sink *sink)
{
	free(sink->data);
	sink->data = NULL;
	if (sink->stream_fd >= 0)
		close(sink->stream_fd);
	sink->stream_fd = -1;
	pthread_mutex_destroy(&sink->lock);
}

/* Writes all n bytes to the stream, if any; called with the lock held. */
static void stream(struct pvt_sink *sink, const uint8_t *bytes, size_t n)
{
	while (sink->stream_fd >= 0 && n && !sink->stream_errno) {
		ssize_t done = write(sink->stream_fd, bytes, n);

		if (done < 0 && errno == EINTR)
			continue;
		if (done <= 0) {
			/* A closed pipe must not stop the guest: stop streaming. */
			sink->stream_errno = done < 0 ? errno : EIO;
			break;
		}
		bytes += done;
		n -= (size_t)done;
	}
}

/*
 * Grows the ring towards room for `needed` bytes, at most to the limit; only
 * called before it wraps (start is 0), so realloc keeps the bytes in order.
 */
static int grow(struct pvt_sink *sink, size_t needed)
{
	size_t capacity = sink->capacity ? sink->capacity : SINK_FIRST_CAPACITY;
	uint8_t *grown;

	while (capacity < needed)
		capacity = capacity > SIZE_MAX / 2 ? SIZE_MAX : capacity * 2;
	if (capacity > sink->limit)
		capacity = sink->limit;
	grown = realloc(sink->data, capacity);
	if (!grown)
		return -ENOMEM;
	sink->data = grown;
	sink->capacity = capacity;
	return 0;
}

/* Appends n bytes to the ring, dropping the oldest beyond the limit. */
static int keep(struct pvt_sink *sink, const uint8_t *bytes, size_t n)
{
	size_t tail, first;
	int ret;

	if (n > sink->limit) {
		sink->dropped += n - sink->limit;
		bytes += n - sink->limit;
		n = sink->limit;
	}
	if (!n)
		return 0;
	if (sink->len + n > sink->capacity && sink->capacity < sink->limit) {
		ret = grow(sink, sink->len + n);
		if (ret)
			return ret;
	}
	if (sink->len + n > sink->capacity) { /* full: capacity is the limit */
		size_t drop = sink->len + n - sink->capacity;

		sink->start = (sink->start + drop) % sink->capacity;
		sink->len -= drop;
		sink->dropped += drop;
	}
	tail = (sink->start + sink->len) % sink->capacity;
	first = n < sink->capacity - tail ? n : sink->capacity - tail;
	memcpy(sink->data + tail, bytes, first);
	memcpy(sink->data, bytes + first, n - first);
	sink->len += n;
	return 0;
}

int pvt_sink_put(struct pvt_sink *sink, const uint8_t *bytes, size_t n)
{
	int ret;

	pthread_mutex_lock(&sink->lock);
	/*
	 * Streamed output is written at once, under the lock: several sinks
	 * may share one file (UART and debug console to stdout) and must
	 * interleave there in the order the guest wrote them.
	 */
	stream(sink, bytes, n);
	ret = keep(sink, bytes, n);
	pthread_mutex_unlock(&sink->lock);
	return ret;
}

int pvt_sink_set_stream(struct pvt_sink *sink, int fd)
{
	int own = -1, old;

	/*
	 * Our own descriptor: the caller may close fd, and a file opened
	 * later under the same number must never receive guest output.
	 */
	if (fd >= 0) {
		own = fcntl(fd, F_DUPFD_CLOEXEC, 0);
		if (own < 0)
			return -errno;
	}
	pthread_mutex_lock(&sink->lock);
	old = sink->stream_fd;
	sink->stream_fd = own;
	sink->stream_errno = 0;
	pthread_mutex_unlock(&sink->lock);
	/* No put can be writing to it any more: it only ran under the lock. */
	if (old >= 0)
		close(old);
	return 0;
}

/* Copies kept bytes [offset, offset + n) out of the ring; lock held. */
static void copy_out(const struct pvt_sink *sink, size_t offset, uint8_t *out,
		     size_t n)
{
	size_t from, first;

	if (!n)
		return;
	from = (sink->start + offset) % sink->capacity;
	first = n < sink->capacity - from ? n : sink->capacity - from;
	memcpy(out, sink->data + from, first);
	memcpy(out + first, sink->data, n - first);
}

/*
 * Puts the ring's last keep_last bytes, then n more, into a new buffer
 * of exactly that size, starting at 0; lock held.
 */
static int rebuild(struct pvt_sink *sink, size_t keep_last,
		   const uint8_t *bytes, size_t n)
{
	size_t capacity = keep_last + n;
	uint8_t *data = NULL;

	if (capacity) {
		data = malloc(capacity);
		if (!data)
			return -ENOMEM;
		copy_out(sink, sink->len - keep_last, data, keep_last);
		if (n)
			memcpy(data + keep_last, bytes, n);
	}
	free(sink->data);
	sink->data = data;
	sink->capacity = capacity;
	sink->start = 0;
	sink->len = capacity;
	return 0;
}

int pvt_sink_set_limit(struct pvt_sink *sink, size_t limit)
{
	size_t keep_last, dropping;
	int ret;

	pthread_mutex_lock(&sink->lock);
	keep_last = sink->len < limit ? sink->len : limit;
	dropping = sink->len - keep_last;
	/* Unwrapped, so that the ring may grow again up to its new limit. */
	ret = rebuild(sink, keep_last, NULL, 0);
	if (!ret) {
		sink->dropped += dropping;
		sink->limit = limit;
	}
	pthread_mutex_unlock(&sink->lock);
	return ret;
}

size_t pvt_sink_copy(struct pvt_sink *sink, size_t offset, uint8_t *out,
		     size_t cap)
{
	size_t total;

	pthread_mutex_lock(&sink->lock);
	total = sink->len;
	if (offset < total)
		copy_out(sink, offset, out,
			 total - offset < cap ? total - offset : cap);
	pthread_mutex_unlock(&sink->lock);
	return total;
}

uint64_t pvt_sink_dropped(struct pvt_sink *sink)
{
	uint64_t dropped;

	pthread_mutex_lock(&sink->lock);
	dropped = sink->dropped;
	pthread_mutex_unlock(&sink->lock);
	return dropped;
}

void pvt_sink_clear(struct pvt_sink *sink)
{
	pthread_mutex_lock(&sink->lock);
	free(sink->data);
	sink->data = NULL;
	sink->capacity = 0;
	sink->start = 0;
	sink->len = 0;
	sink->dropped = 0;
	pthread_mutex_unlock(&sink->lock);
}

int pvt_sink_replace(struct pvt_sink *sink, const uint8_t *bytes, size_t n)
{
	size_t kept;
	int ret;

	pthread_mutex_lock(&sink->lock);
	kept = n < sink->limit ? n : sink->limit;
	/* Restored output was streamed when the guest first wrote it. */
	ret = rebuild(sink, 0, bytes + (n - kept), kept);
	if (!ret)
		sink->dropped = n - kept;
	pthread_mutex_unlock(&sink->lock);
	return ret;
}
