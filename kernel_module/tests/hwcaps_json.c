// SPDX-License-Identifier: GPL-2.0
/*
 * hwcaps_json: PYVT_GET_HW_CAPS as JSON, in the shape of
 * pyvt.kvm.Kvm.get_hw_caps(), between marker lines, for machines too slow
 * to run Python (the Bochs test VM).  The host turns the dump into a
 * report with `pyvt caps --device /dev/pyvt --hw-caps-json FILE`.
 *
 *   hwcaps_json [/dev/pyvt]
 *
 * Exit status 0 when the ioctl answered, 1 otherwise (nothing on stdout).
 */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>
#include "../include/uapi/pyvt.h"

#define MAX_CPUS 256

static void print_cpu(const struct pyvt_cpu_caps *c, int last)
{
	int i;

	printf("  {\"cpu\": %u, \"flags\": %u, \"ext_ecx\": %u, \"feat_ecx\": %u,"
	       " \"svm_eax\": %u, \"svm_ebx\": %u, \"svm_ecx\": %u, \"svm_edx\": %u,"
	       " \"vm_cr\": %llu, \"feature_control\": %llu, \"vmx_msrs\": [",
	       c->cpu, c->flags, c->ext_ecx, c->feat_ecx, c->svm_eax,
	       c->svm_ebx, c->svm_ecx, c->svm_edx,
	       (unsigned long long)c->vm_cr,
	       (unsigned long long)c->feature_control);
	for (i = 0; i < PYVT_VMX_NR_MSRS; i++)
		printf("%s%llu", i ? ", " : "",
		       (unsigned long long)c->vmx_msrs[i]);
	printf("]}%s\n", last ? "" : ",");
}

int main(int argc, char **argv)
{
	const char *dev = argc > 1 ? argv[1] : "/dev/pyvt";
	static struct pyvt_cpu_caps cpus[MAX_CPUS];
	struct pyvt_hw_caps caps = {
		.max_cpus = MAX_CPUS, .cpus = (uintptr_t)cpus,
	};
	unsigned int i, n;
	int fd;

	fd = open(dev, O_RDWR | O_CLOEXEC);
	if (fd < 0 || ioctl(fd, PYVT_GET_HW_CAPS, &caps)) {
		fprintf(stderr, "hwcaps_json: PYVT_GET_HW_CAPS on %s: %s\n",
			dev, strerror(errno));
		return 1;
	}
	close(fd);
	n = caps.nr_cpus < MAX_CPUS ? caps.nr_cpus : MAX_CPUS;
	printf("PYVT-HWCAPS-JSON-BEGIN\n");
	printf("{\"abi_version\": %u, \"vendor\": %u, \"nr_cpus\": %u,"
	       " \"npt_levels\": %u, \"cpus\": [\n", caps.abi_version,
	       caps.vendor, caps.nr_cpus, caps.npt_levels);
	for (i = 0; i < n; i++)
		print_cpu(&cpus[i], i + 1 == n);
	printf("]}\n");
	printf("PYVT-HWCAPS-JSON-END\n");
	return 0;
}
