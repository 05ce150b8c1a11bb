/* SPDX-License-Identifier: MIT */
/*
 * Kicking a vCPU out of KVM_RUN: a POSIX timer of the calling thread sends
 * a signal to that thread; the handler sets kvm_run.immediate_exit, so a
 * kick that lands just before KVM_RUN is not lost.  KVM_RUN then returns
 * EINTR and the run loop goes back to its caller, which checks its timeout
 * and Python's pending signals (Ctrl-C) at that safe point.
 *
 * A thread runs one vCPU at a time, so the timer is per thread (created on
 * first use, deleted when the thread exits), not per vCPU.
 */
#ifndef PVT_KICK_H
#define PVT_KICK_H

#include <linux/kvm.h>
#include <stdint.h>

/* Installs the signal handler once per process; returns 0 or -errno. */
int pvt_kick_setup(void);
int pvt_kick_signal(void);

/* Marks which kvm_run the calling thread is about to run (NULL: none). */
void pvt_kick_set_current(struct kvm_run *run);

/*
 * Arms the calling thread's timer to kick it after first_ns, then every
 * interval_ns (0: once); disarm stops it.
 */
int pvt_kick_arm(uint64_t first_ns, uint64_t interval_ns);
void pvt_kick_disarm(void);

/*
 * Python code (an I/O handler, a signal handler) is about to run on this
 * thread: the kick must not interrupt its system calls with EINTR.  A kick
 * that comes meanwhile waits, and lands when pvt_kick_release() unblocks
 * it: it then ends the next KVM_RUN as usual.
 */
void pvt_kick_hold(void);
void pvt_kick_release(void);

/* Monotonic clock in nanoseconds. */
uint64_t pvt_now_ns(void);

#endif
