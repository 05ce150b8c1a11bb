// SPDX-License-Identifier: MIT
#define _GNU_SOURCE
#include "kick.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

/* glibc before 2.35 names the field only through the union. */
#ifndef sigev_notify_thread_id
#define sigev_notify_thread_id _sigev_un._tid
#endif

static __thread struct kvm_run *volatile current_run;

/* The calling thread's timer, made on first use. */
static __thread timer_t thread_timer;
static __thread bool thread_timer_made;

static pthread_once_t setup_once = PTHREAD_ONCE_INIT;
static pthread_key_t timer_key; /* deletes a thread's timer when it exits */
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

static void delete_thread_timer(void *timer)
{
	timer_delete(*(timer_t *)timer);
	free(timer);
}

/*
 * POSIX timers are not inherited by fork(): in the child, the forking
 * thread's timer id names nothing (timer_settime fails with EINVAL), so it
 * makes a new one on first use.
 */
static void forget_timer_in_child(void)
{
	free(pthread_getspecific(timer_key));
	pthread_setspecific(timer_key, NULL);
	thread_timer_made = false;
}

static void setup(void)
{
	struct sigaction action;

	memset(&action, 0, sizeof(action));
	action.sa_handler = on_kick;
	sigemptyset(&action.sa_mask);
	/* No SA_RESTART: KVM_RUN must come back with EINTR. */
	action.sa_flags = 0;
	if (sigaction(pvt_kick_signal(), &action, NULL))
		setup_result = -errno;
	else
		setup_result = -pthread_key_create(&timer_key, delete_thread_timer);
	if (!setup_result)
		setup_result = -pthread_atfork(NULL, NULL, forget_timer_in_child);
}

int pvt_kick_setup(void)
{
	pthread_once(&setup_once, setup);
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

static int make_thread_timer(void)
{
	struct sigevent event;
	timer_t *owned;

	owned = malloc(sizeof(*owned));
	if (!owned)
		return -ENOMEM;
	memset(&event, 0, sizeof(event));
	event.sigev_notify = SIGEV_THREAD_ID;
	event.sigev_signo = pvt_kick_signal();
	event.sigev_notify_thread_id = gettid();
	if (timer_create(CLOCK_MONOTONIC, &event, owned)) {
		free(owned);
		return -errno;
	}
	thread_timer = *owned;
	thread_timer_made = true;
	pthread_setspecific(timer_key, owned);
	return 0;
}

int pvt_kick_arm(uint64_t first_ns, uint64_t interval_ns)
{
	struct itimerspec when;
	int ret;

	if (!thread_timer_made) {
		ret = make_thread_timer();
		if (ret)
			return ret;
	}
	if (first_ns == 0)
		first_ns = 1; /* zero would disarm the timer */
	when.it_value = to_timespec(first_ns);
	when.it_interval = to_timespec(interval_ns);
	if (timer_settime(thread_timer, 0, &when, NULL))
		return -errno;
	return 0;
}

void pvt_kick_disarm(void)
{
	struct itimerspec off;

	if (!thread_timer_made)
		return;
	memset(&off, 0, sizeof(off));
	timer_settime(thread_timer, 0, &off, NULL);
}

/* The kick's state on this thread's signal mask, outside KVM_RUN. */
static __thread bool thread_kick_blocked;

static void mask_kick(int how)
{
	sigset_t kick;

	sigemptyset(&kick);
	sigaddset(&kick, pvt_kick_signal());
	pthread_sigmask(how, &kick, NULL);
}

void pvt_kick_hold(void)
{
	mask_kick(SIG_BLOCK);
}

void pvt_kick_release(void)
{
	mask_kick(SIG_UNBLOCK);
}

/* The kernel's sigset_t for KVM_SET_SIGNAL_MASK: 64 bits on x86-64. */
#define KERNEL_SIGSET_BYTES 8

int pvt_kick_mask_vcpu(int vcpu_fd)
{
	struct {
		struct kvm_signal_mask head;
		uint8_t sigset[KERNEL_SIGSET_BYTES];
	} mask;
	sigset_t during_run;

	/* During KVM_RUN: this thread's mask, with the kick let through. */
	pthread_sigmask(SIG_BLOCK, NULL, &during_run);
	sigdelset(&during_run, pvt_kick_signal());
	mask.head.len = KERNEL_SIGSET_BYTES;
	memcpy(mask.sigset, &during_run, KERNEL_SIGSET_BYTES);
	if (ioctl(vcpu_fd, KVM_SET_SIGNAL_MASK, &mask))
		return -errno;
	return 0;
}

void pvt_kick_block_outside_run(bool block)
{
	if (thread_kick_blocked == block)
		return;
	mask_kick(block ? SIG_BLOCK : SIG_UNBLOCK);
	thread_kick_blocked = block;
}

void pvt_kick_consume(void)
{
	struct timespec now = { 0, 0 };
	sigset_t kick;

	sigemptyset(&kick);
	sigaddset(&kick, pvt_kick_signal());
	/* Real-time signals queue: a timer tick and a stop() may both wait. */
	while (sigtimedwait(&kick, NULL, &now) > 0)
		;
}
