/* SPDX-License-Identifier: MIT */
/* The host CPU's own CPUID, for capability reports. */
#ifndef PVT_HOST_CPUID_H
#define PVT_HOST_CPUID_H

#include <stdint.h>

void pvt_host_cpuid(uint32_t leaf, uint32_t subleaf, uint32_t out[4]);

#endif
