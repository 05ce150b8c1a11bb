// SPDX-License-Identifier: MIT
#include "host_cpuid.h"

#include <cpuid.h>

void pvt_host_cpuid(uint32_t leaf, uint32_t subleaf, uint32_t out[4])
{
	__cpuid_count(leaf, subleaf, out[0], out[1], out[2], out[3]);
}
