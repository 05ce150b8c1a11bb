/* SPDX-License-Identifier: MIT */
/*
 * Kicking a vCPU out of KVM_RUN: a per-thread POSIX timer sends a signal to
 * the thread running the vCPU; the handler sets kvm_run.immediate_exit so a
 * kick that lands just before KVM_RUN is not lost.  KVM_RUN then returns
 * EINTR and the run loop goes back to its caller, which checks its timeout
 * and Python's pending signals (Ctrl-C) at that safe point.
 */
#ifndef PVT_KICK_H
#define PVT_KICK_H

#include <linux/kvm.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>
#include <time.h>

struct pvt_kicker {
	timer_t timer;
	pid_t owner_tid; /* thread the timer signals; 0 when no timer exists */
};

/* Installs the signal handler once per process; returns 0 or -errno. */
int pvt_kick_setup(void);
int pvt_kick_signal(void);

/* Marks which kvm_run the calling thread is about to run (NULL: none). */
void pvt_kick_set_current(struct kvm_run *run);

/*
 * Arms the kicker to signal the calling thread after first_ns, then every
 * interval_ns (0: once).  Re-creates the timer if another thread owned it.
 */
int pvt_kicker_arm(struct pvt_kicker *kicker, uint64_t first_ns,
		   uint64_t interval_ns);
void pvt_kicker_disarm(struct pvt_kicker *kicker);
void pvt_kicker_destroy(struct pvt_kicker *kicker);

/* Monotonic clock in nanoseconds. */
uint64_t pvt_now_ns(void);

#endif
