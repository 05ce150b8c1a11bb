/* SPDX-License-Identifier: GPL-2.0 */
/* Guest programs assembled from guests.S: [start, end) of each. */
#ifndef GUESTS_H
#define GUESTS_H

extern const unsigned char real_start[], real_end[];
extern const unsigned char triple_start[], triple_end[];
extern const unsigned char spin_start[], spin_end[];
extern const unsigned char pm_start[], pm_end[];
extern const unsigned char lm_start[], lm_end[];
extern const unsigned char gp_start[], gp_end[];
extern const unsigned char slot_start[], slot_end[];
extern const unsigned char loop_start[], loop_end[];
extern const unsigned char fpu_start[], fpu_end[];
extern const unsigned char alu_start[], alu_end[];
extern const unsigned char bench_start[], bench_end[];
extern const unsigned char many_start[], many_end[];
extern const unsigned char ro_start[], ro_end[];
extern const unsigned char xmm_out_start[], xmm_out_end[];

#endif
