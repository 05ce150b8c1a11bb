// SPDX-License-Identifier: MIT
#include "sink.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int pvt_sink_init(struct pvt_sink *sink)
{
	memset(sink, 0, sizeof(*sink));
	sink->stream_fd = -1;
	return -pthread_mutex_init(&sink->lock, NULL);
}

void pvt_sink_destroy(struct pvt_sink *sink)
{
	free(sink->data);
	sink->data = NULL;
	pthread_mutex_destroy(&sink->lock);
}

static void write_pending(struct pvt_sink *sink)
{
	while (sink->stream_fd >= 0 && sink->streamed < sink->len &&
	       !sink->stream_errno) {
		ssize_t n = write(sink->stream_fd, sink->data + sink->streamed,
				  sink->len - sink->streamed);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0) {
			/* A closed pipe must not stop the guest: stop streaming. */
			sink->stream_errno = n < 0 ? errno : EIO;
			break;
		}
		sink->streamed += (size_t)n;
	}
}

/* Makes room for n more bytes; called with the lock held. */
static int reserve(struct pvt_sink *sink, size_t n)
{
	size_t capacity = sink->capacity ? sink->capacity : 4096;
	uint8_t *grown;

	if (sink->len + n <= sink->capacity)
		return 0;
	while (capacity < sink->len + n)
		capacity *= 2;
	grown = realloc(sink->data, capacity);
	if (!grown)
		return -ENOMEM;
	sink->data = grown;
	sink->capacity = capacity;
	return 0;
}

int pvt_sink_put(struct pvt_sink *sink, const uint8_t *bytes, size_t n)
{
	int ret;

	pthread_mutex_lock(&sink->lock);
	ret = reserve(sink, n);
	if (ret)
		goto out;
	memcpy(sink->data + sink->len, bytes, n);
	sink->len += n;
	/*
	 * Streamed output is written at once: several sinks may share one
	 * file (UART and debug console to stdout) and must interleave there
	 * in the order the guest wrote them.
	 */
	write_pending(sink);
out:
	pthread_mutex_unlock(&sink->lock);
	return ret;
}

void pvt_sink_set_stream(struct pvt_sink *sink, int fd)
{
	pthread_mutex_lock(&sink->lock);
	sink->stream_fd = fd;
	sink->streamed = sink->len; /* stream from now on, not the past */
	sink->stream_errno = 0;
	pthread_mutex_unlock(&sink->lock);
}

size_t pvt_sink_copy(struct pvt_sink *sink, size_t offset, uint8_t *out,
		     size_t cap)
{
	size_t total;

	pthread_mutex_lock(&sink->lock);
	total = sink->len;
	if (offset < total) {
		size_t n = total - offset < cap ? total - offset : cap;

		memcpy(out, sink->data + offset, n);
	}
	pthread_mutex_unlock(&sink->lock);
	return total;
}

void pvt_sink_clear(struct pvt_sink *sink)
{
	pthread_mutex_lock(&sink->lock);
	sink->len = 0;
	sink->streamed = 0;
	pthread_mutex_unlock(&sink->lock);
}

int pvt_sink_replace(struct pvt_sink *sink, const uint8_t *bytes, size_t n)
{
	int ret;

	pthread_mutex_lock(&sink->lock);
	sink->len = 0;
	ret = reserve(sink, n);
	if (!ret) {
		memcpy(sink->data, bytes, n);
		sink->len = n;
	}
	/* Restored output was streamed when the guest first wrote it. */
	sink->streamed = sink->len;
	pthread_mutex_unlock(&sink->lock);
	return ret;
}
