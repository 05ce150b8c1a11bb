// SPDX-License-Identifier: MIT
#define _GNU_SOURCE
#include "kick.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <string.h>
#include <unistd.h>

/* glibc before 2.35 names the field only through the union. */
#ifndef sigev_notify_thread_id
#define sigev_notify_thread_id _sigev_un._tid
#endif

static __thread struct kvm_run *volatile current_run;
static pthread_once_t setup_once = PTHREAD_ONCE_INIT;
static int setup_result;

/* A real-time signal nobody else uses by default; Python leaves it alone. */
int pvt_kick_signal(void)
{
	return SIGRTMIN + 5;
}

static void on_kick(int signo)
{
	struct kvm_run *run = current_run;

	(void)signo;
	if (run)
		run->immediate_exit = 1;
}

static void install_handler(void)
{
	struct sigaction action;

	memset(&action, 0, sizeof(action));
	action.sa_handler = on_kick;
	sigemptyset(&action.sa_mask);
	/* No SA_RESTART: KVM_RUN must come back with EINTR. */
	action.sa_flags = 0;
	if (sigaction(pvt_kick_signal(), &action, NULL))
		setup_result = -errno;
}

int pvt_kick_setup(void)
{
	pthread_once(&setup_once, install_handler);
	return setup_result;
}

void pvt_kick_set_current(struct kvm_run *run)
{
	current_run = run;
}

uint64_t pvt_now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static struct timespec to_timespec(uint64_t ns)
{
	return (struct timespec){ .tv_sec = (time_t)(ns / 1000000000ull),
				  .tv_nsec = (long)(ns % 1000000000ull) };
}

int pvt_kicker_arm(struct pvt_kicker *kicker, uint64_t first_ns,
		   uint64_t interval_ns)
{
	pid_t tid = gettid();
	struct itimerspec when;
	sigset_t unblock;

	if (kicker->owner_tid != tid) {
		struct sigevent event;

		pvt_kicker_destroy(kicker);
		memset(&event, 0, sizeof(event));
		event.sigev_notify = SIGEV_THREAD_ID;
		event.sigev_signo = pvt_kick_signal();
		event.sigev_notify_thread_id = tid;
		if (timer_create(CLOCK_MONOTONIC, &event, &kicker->timer))
			return -errno;
		kicker->owner_tid = tid;
	}
	/* The thread may have inherited a mask that blocks the kick. */
	sigemptyset(&unblock);
	sigaddset(&unblock, pvt_kick_signal());
	pthread_sigmask(SIG_UNBLOCK, &unblock, NULL);

	if (first_ns == 0)
		first_ns = 1; /* zero would disarm the timer */
	when.it_value = to_timespec(first_ns);
	when.it_interval = to_timespec(interval_ns);
	if (timer_settime(kicker->timer, 0, &when, NULL))
		return -errno;
	return 0;
}

void pvt_kicker_disarm(struct pvt_kicker *kicker)
{
	struct itimerspec off;

	if (!kicker->owner_tid)
		return;
	memset(&off, 0, sizeof(off));
	timer_settime(kicker->timer, 0, &off, NULL);
}

void pvt_kicker_destroy(struct pvt_kicker *kicker)
{
	if (kicker->owner_tid) {
		timer_delete(kicker->timer);
		kicker->owner_tid = 0;
	}
}
