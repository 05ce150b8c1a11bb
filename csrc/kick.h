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
#include <stdbool.h>
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
 * User code running on a vCPU's thread (a Python I/O handler, a signal
 * handler) must never see the kick: a C call there would fail with EINTR.
 *
 * Where the backend has KVM_SET_SIGNAL_MASK (KVM), the kick is blocked on
 * the thread outside KVM_RUN and let through only during it, as QEMU does:
 * pvt_kick_mask_vcpu() once per vCPU, pvt_kick_block_outside_run(true) as a
 * run starts (a system call only the first time on a thread), and after
 * KVM_RUN returns EINTR, pvt_kick_consume() takes the kick off the queue
 * (still blocked, it would end every later KVM_RUN at once).  A kick that
 * comes while user code runs waits, and ends the next KVM_RUN.  The kick
 * (SIGRTMIN+5, pyvt's own) stays blocked on a thread that ran a vCPU, and
 * processes it forks inherit that; nothing else uses the signal.
 *
 * Elsewhere (pyvt.ko), the kick stays unblocked and its handler sets
 * immediate_exit; pvt_kick_hold()/pvt_kick_release() block it around user
 * code, at the cost of two system calls each time.
 */
int pvt_kick_mask_vcpu(int vcpu_fd);
void pvt_kick_block_outside_run(bool block);
void pvt_kick_consume(void);
void pvt_kick_hold(void);
void pvt_kick_release(void);

/* Monotonic clock in nanoseconds. */
uint64_t pvt_now_ns(void);

#endif
