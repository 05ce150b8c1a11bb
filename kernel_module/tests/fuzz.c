// SPDX-License-Identifier: GPL-2.0
/*
 * fuzz: throw random and malformed requests at a KVM-API device.  It
 * checks nothing itself; the harness checks dmesg, the module's page
 * count and that rmmod works afterwards.
 *
 *   fuzz /dev/pyvt [operations] [seed]
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>
#include <linux/kvm.h>
#include "../include/uapi/pyvt.h"

#define NFD	8
#define BUFSZ	(1 << 20)

static const char *dev;
static int sys_fds[NFD], vm_fds[NFD], vcpu_fds[NFD];
static struct kvm_run *runs[NFD];
static unsigned long exits[64];
static unsigned char *buf;
static unsigned char scratch[16384];
static unsigned long ops, ok, errs[256];
static sigjmp_buf bus_jmp;

static uint64_t rnd64(void)
{
	return (uint64_t)random() << 33 ^ (uint64_t)random() << 11 ^ random();
}

static int pick(int n)
{
	return random() % n;
}

static int *slot_of(int *fds)
{
	return &fds[pick(NFD)];
}

static int any_fd(void)
{
	switch (pick(6)) {
	case 0: return *slot_of(sys_fds);
	case 1: return *slot_of(vm_fds);
	case 2: return *slot_of(vcpu_fds);
	case 3: return -1;
	case 4: return 1000 + pick(100);
	default: return pick(8);	/* stdio and friends */
	}
}

static void *any_ptr(void)
{
	switch (pick(7)) {
	case 0: return NULL;
	case 1: return (void *)0xffff888000000000ULL;
	case 2: return (void *)(uintptr_t)rnd64();
	case 3: return buf + pick(BUFSZ);
	case 4: return buf + BUFSZ - pick(64);	/* runs off the end */
	default:
		for (size_t i = 0; i < sizeof(scratch); i++)
			scratch[i] = random();
		return scratch;
	}
}

static uint64_t any_size(void)
{
	static const uint64_t sizes[] = {
		0, 4096, 8192, 65536, 4095, 4097, 1 << 20, 1ULL << 30,
		1ULL << 40, ~0ULL, ~0ULL << 12, 1ULL << 63,
	};

	return pick(3) ? sizes[pick(12)] : rnd64();
}

static uint64_t any_gpa(void)
{
	static const uint64_t gpas[] = {
		0, 0x1000, 0x10000, 0x100000, 0xfffff000, 1ULL << 32,
		(1ULL << 48) - 4096, 1ULL << 48, 1ULL << 52, ~0ULL << 12,
		0x800, 0x1001,
	};

	return pick(3) ? gpas[pick(12)] : rnd64();
}

static void count(long r)
{
	ops++;
	if (r >= 0)
		ok++;
	else
		errs[errno & 255]++;
}

static void close_fd(int *fd)
{
	if (*fd > 0)
		close(*fd);
	*fd = 0;
}

static void memory_region(void)
{
	struct kvm_userspace_memory_region mr = {
		.slot = pick(4) ? pick(34) : (uint32_t)rnd64(),
		.flags = pick(8) ? pick(3) : (uint32_t)rnd64(),
		.guest_phys_addr = any_gpa(),
		.memory_size = any_size(),
	};

	switch (pick(4)) {
	case 0:
		mr.userspace_addr = (uintptr_t)any_ptr();
		break;
	default:
		mr.userspace_addr = (uintptr_t)buf + pick(BUFSZ / 4096) * 4096;
		if (pick(2))
			mr.memory_size = pick(64) * 4096;
	}
	count(ioctl(*slot_of(vm_fds), KVM_SET_USER_MEMORY_REGION,
		    pick(10) ? (void *)&mr : any_ptr()));
}

static void vcpu_state(int idx)
{
	int fd = vcpu_fds[idx];
	struct kvm_regs regs;
	struct kvm_sregs sregs;
	struct {
		struct kvm_cpuid2 hdr;
		struct kvm_cpuid_entry2 e[8];
	} cpuid;
	unsigned int i;

	switch (pick(9)) {
	case 6: {
		struct kvm_fpu fpu;

		for (i = 0; i < sizeof(fpu); i++)
			((unsigned char *)&fpu)[i] = random();
		if (pick(2))
			fpu.mxcsr &= 0xffff;
		count(ioctl(fd, pick(4) ? KVM_SET_FPU : KVM_GET_FPU,
			    pick(8) ? (void *)&fpu : any_ptr()));
		break;
	}
	case 7: {
		static const uint32_t known[] = {
			0xc0000080, 0xc0000081, 0xc0000082, 0xc0000083,
			0xc0000084, 0xc0000100, 0xc0000101, 0xc0000102,
			0x174, 0x175, 0x176, 0x277, 0x1b, 0x10, 0xc0000103,
		};
		struct {
			struct kvm_msrs hdr;
			struct kvm_msr_entry e[4];
		} m = { .hdr.nmsrs = pick(6) ? pick(5) : (uint32_t)rnd64() };

		for (i = 0; i < 4; i++) {
			m.e[i].index = pick(4) ? known[pick(15)] : (uint32_t)rnd64();
			m.e[i].data = pick(2) ? rnd64() : (uint64_t)pick(4096);
		}
		count(ioctl(fd, pick(2) ? KVM_SET_MSRS : KVM_GET_MSRS,
			    pick(8) ? (void *)&m : any_ptr()));
		break;
	}
	case 8: {
		struct {
			struct kvm_cpuid2 hdr;
			struct kvm_cpuid_entry2 e[4];
		} c = { .hdr.nent = pick(6) };

		count(ioctl(fd, KVM_GET_CPUID2, pick(8) ? (void *)&c : any_ptr()));
		break;
	}
	case 0:
		for (i = 0; i < sizeof(regs); i++)
			((unsigned char *)&regs)[i] = random();
		if (pick(2))
			regs.rip = pick(0x10000);
		count(ioctl(fd, KVM_SET_REGS, &regs));
		break;
	case 1:
		if (ioctl(fd, KVM_GET_SREGS, &sregs))
			break;
		for (i = 0; i < 1 + pick(4); i++)
			((unsigned char *)&sregs)[pick(sizeof(sregs))] = random();
		count(ioctl(fd, KVM_SET_SREGS, &sregs));
		break;
	case 2:
		for (i = 0; i < sizeof(cpuid); i++)
			((unsigned char *)&cpuid)[i] = random();
		if (pick(2))
			cpuid.hdr.nent = pick(9);
		count(ioctl(fd, KVM_SET_CPUID2, &cpuid));
		break;
	case 3:
		count(ioctl(fd, KVM_GET_REGS, any_ptr()));
		break;
	default:
		/* Random guest code where the guest probably is. */
		for (i = 0; i < 4096; i++)
			buf[pick(0x20000)] = random();
		if (!ioctl(fd, KVM_RUN, pick(20) ? 0 : rnd64())) {
			count(0);
			if (runs[idx])
				exits[runs[idx]->exit_reason & 63]++;
		} else {
			count(-1);
		}
	}
}

static void random_code_vm(void);

static void close_vcpu(int i)
{
	if (runs[i])
		munmap(runs[i], 4096);
	runs[i] = NULL;
	close_fd(&vcpu_fds[i]);
}

static void one_op(void)
{
	int *fd, r, i;

	switch (pick(16)) {
	case 0:
		fd = slot_of(sys_fds);
		close_fd(fd);
		*fd = open(dev, O_RDWR);
		break;
	case 1:
		fd = slot_of(vm_fds);
		close_fd(fd);
		r = ioctl(*slot_of(sys_fds), KVM_CREATE_VM, pick(4) ? 0 : rnd64());
		count(r);
		*fd = r > 0 ? r : 0;
		break;
	case 2:
	case 3:
		memory_region();
		break;
	case 4:
		i = pick(NFD);
		close_vcpu(i);
		r = ioctl(*slot_of(vm_fds), KVM_CREATE_VCPU,
			  pick(3) ? pick(10) : rnd64());
		count(r);
		vcpu_fds[i] = r > 0 ? r : 0;
		if (r > 0) {
			runs[i] = mmap(NULL, 4096, PROT_READ | PROT_WRITE,
				       MAP_SHARED, r, 0);
			if (runs[i] == MAP_FAILED)
				runs[i] = NULL;
		}
		break;
	case 5:
	case 6:
	case 7:
		vcpu_state(pick(NFD));
		break;
	case 8:
		/* A random ioctl: KVM's magic, pyvt's magic or anything. */
		r = pick(3) == 0 ? (int)rnd64() :
		    (int)(_IOC(pick(4), pick(2) ? KVMIO : PYVT_IO, pick(256),
			       pick(3) ? pick(512) : pick(16384)));
		count(ioctl(any_fd(), r, pick(2) ? any_ptr() : (void *)rnd64()));
		break;
	case 9: {
		struct pyvt_hw_caps caps = {
			.max_cpus = pick(3) ? pick(5) : (uint32_t)rnd64(),
			.cpus = (uintptr_t)any_ptr(),
		};
		count(ioctl(*slot_of(sys_fds), PYVT_GET_HW_CAPS,
			    pick(5) ? (void *)&caps : any_ptr()));
		break;
	}
	case 10: {
		struct pyvt_roundtrip rt = {
			.iterations = pick(3) ? pick(300) : (uint32_t)rnd64(),
		};
		count(ioctl(*slot_of(sys_fds), PYVT_MEASURE_ROUNDTRIP, &rt));
		break;
	}
	case 11: {
		struct {
			struct kvm_cpuid2 hdr;
			struct kvm_cpuid_entry2 e[64];
		} c = { .hdr.nent = pick(3) ? pick(70) : (uint32_t)rnd64() };
		count(ioctl(*slot_of(sys_fds), KVM_GET_SUPPORTED_CPUID,
			    pick(5) ? (void *)&c : any_ptr()));
		break;
	}
	case 12: {
		void *p = mmap(NULL, pick(4) * 4096 + 4096, PROT_READ | PROT_WRITE,
			       MAP_SHARED, *slot_of(vcpu_fds), pick(4) * 4096);
		count(p == MAP_FAILED ? -1 : 0);
		if (p != MAP_FAILED) {
			/* Pages past the run area may SIGBUS, as in KVM. */
			if (!sigsetjmp(bus_jmp, 1))
				(void)((volatile char *)p)[pick(4096)];
			munmap(p, 4096);
		}
		break;
	}
	case 13: {
		struct {
			struct kvm_msr_list hdr;
			uint32_t idx[32];
		} l = { .hdr.nmsrs = pick(40) };

		count(ioctl(*slot_of(sys_fds), KVM_GET_MSR_INDEX_LIST,
			    pick(8) ? (void *)&l : any_ptr()));
		count(ioctl(*slot_of(sys_fds), KVM_CHECK_EXTENSION, rnd64() % 300));
		count(ioctl(*slot_of(vm_fds), KVM_CHECK_EXTENSION, pick(300)));
		break;
	}
	case 14:
		random_code_vm();
		/* Replace the memory under pinned slots. */
		if (!pick(8)) {
			munmap(buf, BUFSZ);
			buf = mmap(buf, BUFSZ, PROT_READ | PROT_WRITE,
				   MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
		}
		break;
	default:
		if (pick(2))
			close_fd(slot_of(vm_fds));
		else
			close_vcpu(pick(NFD));
	}
}

/*
 * A well-formed real-mode VM running random bytes: the decoders and exit
 * paths (port and string I/O, MMIO above 64K, HLT, faults) see junk.
 */
static void random_code_vm(void)
{
	struct kvm_userspace_memory_region mr = { .memory_size = 0x10000 };
	struct kvm_regs regs = { .rflags = 2 };
	struct kvm_sregs sregs;
	struct kvm_run *run;
	int sys, vm, vcpu, i;

	sys = open(dev, O_RDWR);
	vm = ioctl(sys, KVM_CREATE_VM, 0);
	mr.userspace_addr = (uintptr_t)buf + 0x40000;
	vcpu = -1;
	if (vm < 0 || ioctl(vm, KVM_SET_USER_MEMORY_REGION, &mr))
		goto out;
	vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
	run = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
	if (vcpu < 0 || run == MAP_FAILED || ioctl(vcpu, KVM_GET_SREGS, &sregs))
		goto out;
	sregs.cs.base = 0;
	sregs.cs.selector = 0;
	if (pick(2)) {		/* sometimes 32-bit flat protected mode */
		sregs.cr0 |= 1;
		sregs.cs.db = 1;
		sregs.cs.type = 11;
		sregs.cs.limit = 0xffffffff;
		sregs.ds.limit = 0xffffffff;
		sregs.es.limit = 0xffffffff;
	}
	for (i = 0; i < 0x10000; i++)
		buf[0x40000 + i] = pick(4) ? random() : 0x90 + pick(0x70);
	regs.rip = pick(0xfff0);
	regs.rsp = pick(0x10000);
	regs.rsi = pick(0x20000);
	regs.rdi = pick(0x20000);
	regs.rcx = pick(64);
	regs.rdx = pick(0x400);
	ioctl(vcpu, KVM_SET_SREGS, &sregs);
	ioctl(vcpu, KVM_SET_REGS, &regs);
	for (i = 0; i < 50; i++) {
		if (ioctl(vcpu, KVM_RUN, 0)) {
			count(-1);
			break;
		}
		count(0);
		exits[run->exit_reason & 63]++;
		if (run->exit_reason != KVM_EXIT_IO &&
		    run->exit_reason != KVM_EXIT_MMIO &&
		    run->exit_reason != KVM_EXIT_HLT)
			break;
	}
	munmap(run, 4096);
out:
	if (vcpu >= 0)
		close(vcpu);
	if (vm >= 0)
		close(vm);
	close(sys);
}

static void on_alarm(int sig)
{
	(void)sig;
}

static void on_bus(int sig)
{
	(void)sig;
	siglongjmp(bus_jmp, 1);
}

static void *spin_thread(void *arg)
{
	int vcpu = (intptr_t)arg;

	ioctl(vcpu, KVM_RUN, 0);
	return NULL;
}

/* Close a vCPU's and its VM's fds while another thread runs the vCPU. */
static void close_while_running(void)
{
	struct kvm_userspace_memory_region mr = { .memory_size = 0x10000 };
	struct kvm_regs regs = { .rip = 0x1000, .rflags = 2 };
	struct kvm_sregs sregs;
	int sys, vm, vcpu, i;
	pthread_t t;

	sys = open(dev, O_RDWR);
	vm = ioctl(sys, KVM_CREATE_VM, 0);
	mr.userspace_addr = (uintptr_t)buf;
	ioctl(vm, KVM_SET_USER_MEMORY_REGION, &mr);
	vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
	ioctl(vcpu, KVM_GET_SREGS, &sregs);
	sregs.cs.base = 0;
	sregs.cs.selector = 0;
	ioctl(vcpu, KVM_SET_SREGS, &sregs);
	ioctl(vcpu, KVM_SET_REGS, &regs);
	buf[0x1000] = 0xeb;	/* jmp . */
	buf[0x1001] = 0xfe;
	pthread_create(&t, NULL, spin_thread, (void *)(intptr_t)vcpu);
	usleep(20000);
	/* Slot changes wait for the running vCPU, then take effect. */
	mr.memory_size = 0;
	ioctl(vm, KVM_SET_USER_MEMORY_REGION, &mr);
	close(vm);
	close(vcpu);
	close(sys);
	for (i = 0; i < 100 && pthread_tryjoin_np(t, NULL); i++)
		usleep(10000);
	pthread_join(t, NULL);
}

/* A child of fork() must not drive the parent's VM. */
static void fork_child_use(void)
{
	int sys = open(dev, O_RDWR), vm = ioctl(sys, KVM_CREATE_VM, 0);
	pid_t pid = fork();

	if (pid == 0) {
		int r = ioctl(vm, KVM_CREATE_VCPU, 0);

		_exit(r < 0 && errno == EIO ? 0 : 1);
	}
	if (pid > 0) {
		int st;

		waitpid(pid, &st, 0);
		printf("FUZZ forked child using parent's VM fd: %s\n",
		       WIFEXITED(st) && !WEXITSTATUS(st) ? "EIO as expected" :
		       "UNEXPECTED");
	}
	close(vm);
	close(sys);
}

int main(int argc, char **argv)
{
	struct sigaction sa = { .sa_handler = on_alarm };
	struct itimerval it = { { 0, 5000 }, { 0, 5000 } };
	unsigned long n, i;
	int e;

	dev = argc > 1 ? argv[1] : "/dev/pyvt";
	n = argc > 2 ? strtoul(argv[2], NULL, 0) : 5000;
	srandom(argc > 3 ? strtoul(argv[3], NULL, 0) : 1);
	setvbuf(stdout, NULL, _IOLBF, 0);
	buf = mmap(NULL, BUFSZ, PROT_READ | PROT_WRITE,
		   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	sigaction(SIGALRM, &sa, NULL);
	sa.sa_handler = on_bus;
	sigaction(SIGBUS, &sa, NULL);
	setitimer(ITIMER_REAL, &it, NULL);

	for (i = 0; i < n; i++)
		one_op();
	for (i = 0; i < NFD; i++) {
		close_vcpu(i);
		close_fd(&vm_fds[i]);
		close_fd(&sys_fds[i]);
	}
	it.it_value.tv_usec = 0;
	it.it_interval.tv_usec = 0;
	close_while_running();
	fork_child_use();
	printf("FUZZ %lu calls, %lu succeeded; errno counts:", ops, ok);
	for (e = 0; e < 256; e++)
		if (errs[e])
			printf(" %s=%lu", strerrorname_np(e) ? strerrorname_np(e) : "?", errs[e]);
	printf("\nFUZZ KVM_RUN exit reasons:");
	for (e = 0; e < 64; e++)
		if (exits[e])
			printf(" %d=%lu", e, exits[e]);
	printf("\n");
	return 0;
}
