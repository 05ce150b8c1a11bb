/* SPDX-License-Identifier: MIT */
/*
 * Settling an I/O exit outside the run loop.
 *
 * After a port-I/O, MMIO or user-space MSR exit, KVM finishes the
 * instruction on the next KVM_RUN: a read's data goes from kvm_run into the
 * registers and RIP moves past the instruction (an MSR access whose
 * msr.error is set takes #GP instead).  Register writes made in between
 * race with that completion (KVM's emulator writes its own copy of the
 * registers back on top of them), and a snapshot or restore must not leave
 * it for later.  So pyvt settles a pending access first, by one of:
 *
 *   finish:  KVM_RUN with immediate_exit completes the access with what is
 *            in kvm_run (a reply, or all ones) and returns before any guest
 *            code runs;
 *   abandon: for a read, the same, then the registers are put back as
 *            they were at the exit, so the instruction runs again on the
 *            next run (used when a handler raised, and before a restore).
 *            A write is finished instead: the host has seen it, and where
 *            KVM's emulator ran it the guest is already past it, so it is
 *            never made twice, on any backend.
 *
 * A string instruction (rep ins/outs) or an MMIO access split across pages
 * can need further round trips to finish; nobody is there to answer them
 * now, so their reads get all ones and their writes are dropped (at most
 * PVT_SETTLE_ROUNDS of them).
 */
#ifndef PVT_IO_COMPLETION_H
#define PVT_IO_COMPLETION_H

#include "vcpu_loop.h"

#define PVT_SETTLE_ROUNDS 4096

/* Returns 0, or -errno (-EPROTO: KVM stopped for something else). */
int pvt_vcpu_finish_io(struct pvt_vcpu *vcpu);
int pvt_vcpu_abandon_io(struct pvt_vcpu *vcpu);

#endif
