// SPDX-License-Identifier: GPL-2.0
/*
 * bench: port-I/O exit round trips (KVM_RUN -> OUT -> back in user
 * space) through two backends side by side, interleaved in rounds so
 * drift hits both alike, plus pyvt's in-kernel VMRUN round trip.
 *
 *   bench [exits-per-round] [rounds] [dev-a] [dev-b]
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>
#include <linux/kvm.h>
#include "../include/uapi/pyvt.h"
#include "guests.h"


struct backend {
	const char *dev;
	int sys, vm, vcpu;
	struct kvm_run *run;
	int run_size;
	void *mem;
	double *samples;
	int n;
};

static int setup(struct backend *b)
{
	struct kvm_userspace_memory_region mr = { .memory_size = 0x10000 };
	struct kvm_sregs sregs;
	struct kvm_regs regs = { .rip = 0x1000, .rflags = 2 };
	void *mem;

	b->run = MAP_FAILED;
	b->sys = open(b->dev, O_RDWR);
	if (b->sys < 0)
		return -1;
	b->vm = ioctl(b->sys, KVM_CREATE_VM, 0);
	mem = mmap(NULL, 0x10000, PROT_READ | PROT_WRITE,
		   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	b->mem = mem;
	if (b->vm < 0 || mem == MAP_FAILED)
		return -1;
	memcpy((char *)mem + 0x1000, bench_start, bench_end - bench_start);
	mr.userspace_addr = (uintptr_t)mem;
	if (ioctl(b->vm, KVM_SET_USER_MEMORY_REGION, &mr))
		return -1;
	b->vcpu = ioctl(b->vm, KVM_CREATE_VCPU, 0);
	if (b->vcpu < 0)
		return -1;
	b->run_size = ioctl(b->sys, KVM_GET_VCPU_MMAP_SIZE, 0);
	b->run = mmap(NULL, b->run_size,
		      PROT_READ | PROT_WRITE, MAP_SHARED, b->vcpu, 0);
	if (b->run == MAP_FAILED || ioctl(b->vcpu, KVM_GET_SREGS, &sregs))
		return -1;
	sregs.cs.base = 0;
	sregs.cs.selector = 0;
	if (ioctl(b->vcpu, KVM_SET_SREGS, &sregs) ||
	    ioctl(b->vcpu, KVM_SET_REGS, &regs))
		return -1;
	return 0;
}

static void teardown(struct backend *b)
{
	/* Drop everything, the mapping too, so the other can own SVM. */
	if (b->run != MAP_FAILED)
		munmap(b->run, b->run_size);
	munmap(b->mem, 0x10000);
	close(b->vcpu);
	close(b->vm);
	close(b->sys);
}

static double now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e9 + ts.tv_nsec;
}

static int measure(struct backend *b, int exits)
{
	double t0, t1;
	int i;

	if (setup(b)) {
		printf("FAIL setup %s: %s\n", b->dev, strerror(errno));
		return -1;
	}
	for (i = 0; i < exits + 10; i++) {
		t0 = now_ns();
		if (ioctl(b->vcpu, KVM_RUN, 0) ||
		    b->run->exit_reason != KVM_EXIT_IO) {
			printf("FAIL %s: run %d exit %u %s\n", b->dev, i,
			       b->run->exit_reason, strerror(errno));
			teardown(b);
			return -1;
		}
		t1 = now_ns();
		if (i >= 10)	/* warm-up */
			b->samples[b->n++] = t1 - t0;
	}
	teardown(b);
	return 0;
}

static int cmp(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return x < y ? -1 : x > y;
}

static double median(struct backend *b)
{
	qsort(b->samples, b->n, sizeof(double), cmp);
	return b->samples[b->n / 2];
}

static const char *const vmx_msr_names[PYVT_VMX_NR_MSRS] = {
	"BASIC", "PINBASED_CTLS", "PROCBASED_CTLS", "EXIT_CTLS",
	"ENTRY_CTLS", "MISC", "CR0_FIXED0", "CR0_FIXED1", "CR4_FIXED0",
	"CR4_FIXED1", "VMCS_ENUM", "PROCBASED_CTLS2", "EPT_VPID_CAP",
	"TRUE_PINBASED_CTLS", "TRUE_PROCBASED_CTLS", "TRUE_EXIT_CTLS",
	"TRUE_ENTRY_CTLS", "VMFUNC",
};

/* AMD: the SVM leaf and VM_CR; SVM and nested paging are required. */
static int print_svm_caps(const struct pyvt_hw_caps *caps,
			  const struct pyvt_cpu_caps *cpus)
{
	unsigned int i;

	for (i = 0; i < caps->nr_cpus && i < 64; i++)
		printf("CAPS cpu %u: svm rev %u asids %u features %#x vm_cr %#llx%s\n",
		       cpus[i].cpu, cpus[i].svm_eax & 0xff, cpus[i].svm_ebx,
		       cpus[i].svm_edx, (unsigned long long)cpus[i].vm_cr,
		       cpus[i].flags & PYVT_CPU_CAPS_VM_CR_VALID ? "" :
		       " (unreadable)");
	if (!(cpus[0].ext_ecx & 4) || !(cpus[0].svm_edx & 1)) {
		printf("FAIL PYVT_GET_HW_CAPS: expected AMD with SVM and NPT\n");
		return -1;
	}
	return 0;
}

/* Intel: IA32_FEATURE_CONTROL and the VMX MSRs, which must have been read. */
static int print_vmx_caps(const struct pyvt_hw_caps *caps,
			  const struct pyvt_cpu_caps *cpus)
{
	unsigned int i, m;

	for (i = 0; i < caps->nr_cpus && i < 64; i++) {
		printf("CAPS cpu %u: vmx %s feature_control %#llx%s\n",
		       cpus[i].cpu, cpus[i].feat_ecx & (1 << 5) ? "yes" : "no",
		       (unsigned long long)cpus[i].feature_control,
		       cpus[i].flags & PYVT_CPU_CAPS_VMX_VALID ? "" :
		       " (VMX MSRs unread)");
		if (!(cpus[i].flags & PYVT_CPU_CAPS_VMX_VALID))
			continue;
		for (m = 0; m < PYVT_VMX_NR_MSRS; m++)
			printf("CAPS cpu %u:   %#x IA32_VMX_%-19s %#018llx\n",
			       cpus[i].cpu, PYVT_VMX_MSR_FIRST + m,
			       vmx_msr_names[m],
			       (unsigned long long)cpus[i].vmx_msrs[m]);
	}
	if (!(cpus[0].feat_ecx & (1 << 5)) ||
	    !(cpus[0].flags & PYVT_CPU_CAPS_VMX_VALID)) {
		printf("FAIL PYVT_GET_HW_CAPS: expected Intel with VMX and its MSRs read\n");
		return -1;
	}
	return 0;
}

/* PYVT_GET_HW_CAPS: one line per CPU (Intel: and its VMX MSRs). */
static int print_caps(int fd)
{
	struct pyvt_cpu_caps cpus[64];
	struct pyvt_hw_caps caps = {
		.max_cpus = 64, .cpus = (uintptr_t)cpus,
	};

	if (ioctl(fd, PYVT_GET_HW_CAPS, &caps)) {
		printf("FAIL PYVT_GET_HW_CAPS: %s\n", strerror(errno));
		return -1;
	}
	printf("CAPS abi %u vendor %u (1=AMD 2=Intel) cpus %u npt_levels %u\n",
	       caps.abi_version, caps.vendor, caps.nr_cpus, caps.npt_levels);
	if (!caps.nr_cpus) {
		printf("FAIL PYVT_GET_HW_CAPS: no CPU reported\n");
		return -1;
	}
	if (caps.vendor == PYVT_VENDOR_AMD)
		return print_svm_caps(&caps, cpus);
	if (caps.vendor == PYVT_VENDOR_INTEL)
		return print_vmx_caps(&caps, cpus);
	printf("FAIL PYVT_GET_HW_CAPS: unknown vendor %u\n", caps.vendor);
	return -1;
}

int main(int argc, char **argv)
{
	int exits = argc > 1 ? atoi(argv[1]) : 2000;
	int rounds = argc > 2 ? atoi(argv[2]) : 3;
	struct backend a = { .dev = argc > 3 ? argv[3] : "/dev/pyvt" };
	struct backend b = { .dev = argc > 4 ? argv[4] : "/dev/kvm" };
	struct pyvt_roundtrip rt = { .iterations = 10000 };
	double ma, mb;
	int r, fd;

	a.samples = calloc(exits * rounds, sizeof(double));
	b.samples = calloc(exits * rounds, sizeof(double));
	for (r = 0; r < rounds; r++)
		if (measure(&a, exits) || measure(&b, exits))
			return 1;
	ma = median(&a);
	mb = median(&b);
	printf("BENCH port-I/O exit round trip, %d exits x %d rounds each, interleaved\n",
	       exits, rounds);
	printf("BENCH %-10s median %9.0f ns  min %9.0f ns\n", a.dev, ma,
	       a.samples[0]);
	printf("BENCH %-10s median %9.0f ns  min %9.0f ns\n", b.dev, mb,
	       b.samples[0]);
	printf("BENCH ratio %s/%s = %.2f\n", a.dev, b.dev, ma / mb);

	fd = open("/dev/pyvt", O_RDWR);
	if (fd >= 0 && print_caps(fd))
		return 1;
	if (fd < 0 || ioctl(fd, PYVT_MEASURE_ROUNDTRIP, &rt)) {
		printf("FAIL PYVT_MEASURE_ROUNDTRIP: %s\n", strerror(errno));
		return 1;
	}
	printf("BENCH PYVT_MEASURE_ROUNDTRIP: %u samples on cpu %u: min %llu median %llu max %llu cycles, tsc %llu kHz (median %.0f ns)\n",
	       rt.iterations, rt.cpu, (unsigned long long)rt.min_cycles,
	       (unsigned long long)rt.median_cycles,
	       (unsigned long long)rt.max_cycles,
	       (unsigned long long)rt.tsc_khz,
	       rt.tsc_khz ? rt.median_cycles * 1e6 / rt.tsc_khz : 0.0);
	close(fd);
	return 0;
}
