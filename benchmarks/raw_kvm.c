// SPDX-License-Identifier: MIT
/*
 * The raw-C baseline for pyvt's benchmarks: the same guests driven with bare
 * KVM ioctls and a plain switch on the exit reason, nothing else.
 *
 *   raw_kvm exits   GUEST COUNT PORT  one port-I/O exit per loop iteration
 *   raw_kvm spawn   GUEST COUNT       create VM, memory, vCPU, run to hlt
 *   raw_kvm lifecycle GUEST COUNT     the same, then tear the VM down
 *   raw_kvm console GUEST COUNT       count bytes written to 0xe9 / 0x3f8
 *
 * GUEST is a flat real-mode binary loaded at 0x1000; the guest's loop count
 * goes in ECX and the port in EDX.  Each mode prints one line of JSON with
 * the wall and user-CPU time of the measured part.
 *
 * Built with -DRAW_KVM_LIBRARY it is a shared object instead (raw_exits(),
 * raw_spawn(), raw_lifecycle()), so the benchmark can also run the baseline inside its own
 * process: the kernel's cost of an exit grows with the caller's address
 * space on some hosts, and in-process figures isolate what pyvt adds.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#define MEMORY_SIZE (1 << 20)
#define LOAD_ADDRESS 0x1000

static void die(const char *what)
{
	fprintf(stderr, "raw_kvm: %s: %s\n", what, strerror(errno));
	exit(1);
}

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static uint64_t user_ns(void)
{
	struct rusage usage;

	getrusage(RUSAGE_SELF, &usage);
	return (uint64_t)usage.ru_utime.tv_sec * 1000000000ull +
	       (uint64_t)usage.ru_utime.tv_usec * 1000ull;
}

struct vm {
	int fd, vcpu;
	uint8_t *memory;
	struct kvm_run *run;
};

static int kvm_fd;
static int run_size;
static struct kvm_cpuid2 *cpuid;

static void setup_system(void)
{
	kvm_fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm_fd < 0)
		die("open /dev/kvm");
	if (ioctl(kvm_fd, KVM_GET_API_VERSION, 0) != 12)
		die("KVM API version");
	run_size = ioctl(kvm_fd, KVM_GET_VCPU_MMAP_SIZE, 0);
	if (run_size < 0)
		die("KVM_GET_VCPU_MMAP_SIZE");
	cpuid = calloc(1, sizeof(*cpuid) + 256 * sizeof(cpuid->entries[0]));
	cpuid->nent = 256;
	if (ioctl(kvm_fd, KVM_GET_SUPPORTED_CPUID, cpuid) < 0)
		die("KVM_GET_SUPPORTED_CPUID");
}

static void create_vm(struct vm *vm, const uint8_t *code, size_t len)
{
	struct kvm_userspace_memory_region region;
	struct kvm_sregs sregs;
	struct kvm_regs regs;

	vm->fd = ioctl(kvm_fd, KVM_CREATE_VM, 0);
	if (vm->fd < 0)
		die("KVM_CREATE_VM");
	if (ioctl(vm->fd, KVM_SET_TSS_ADDR, 0xfffbd000) < 0)
		die("KVM_SET_TSS_ADDR");
	vm->memory = mmap(NULL, MEMORY_SIZE, PROT_READ | PROT_WRITE,
			  MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (vm->memory == MAP_FAILED)
		die("mmap memory");
	memcpy(vm->memory + LOAD_ADDRESS, code, len);
	region = (struct kvm_userspace_memory_region){
		.slot = 0, .guest_phys_addr = 0, .memory_size = MEMORY_SIZE,
		.userspace_addr = (uint64_t)(uintptr_t)vm->memory,
	};
	if (ioctl(vm->fd, KVM_SET_USER_MEMORY_REGION, &region) < 0)
		die("KVM_SET_USER_MEMORY_REGION");
	vm->vcpu = ioctl(vm->fd, KVM_CREATE_VCPU, 0);
	if (vm->vcpu < 0)
		die("KVM_CREATE_VCPU");
	vm->run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED,
		       vm->vcpu, 0);
	if (vm->run == MAP_FAILED)
		die("mmap kvm_run");
	if (ioctl(vm->vcpu, KVM_SET_CPUID2, cpuid) < 0)
		die("KVM_SET_CPUID2");
	if (ioctl(vm->vcpu, KVM_GET_SREGS, &sregs) < 0)
		die("KVM_GET_SREGS");
	sregs.cs.base = 0;
	sregs.cs.selector = 0;
	if (ioctl(vm->vcpu, KVM_SET_SREGS, &sregs) < 0)
		die("KVM_SET_SREGS");
	memset(&regs, 0, sizeof(regs));
	regs.rip = LOAD_ADDRESS;
	regs.rflags = 2;
	if (ioctl(vm->vcpu, KVM_SET_REGS, &regs) < 0)
		die("KVM_SET_REGS");
}

static void destroy_vm(struct vm *vm)
{
	munmap(vm->run, run_size);
	close(vm->vcpu);
	close(vm->fd);
	munmap(vm->memory, MEMORY_SIZE);
}

static void set_count_and_port(struct vm *vm, uint64_t count, uint64_t port)
{
	struct kvm_regs regs;

	if (ioctl(vm->vcpu, KVM_GET_REGS, &regs) < 0)
		die("KVM_GET_REGS");
	regs.rcx = count;
	regs.rdx = port;
	if (ioctl(vm->vcpu, KVM_SET_REGS, &regs) < 0)
		die("KVM_SET_REGS");
}

/* Runs to hlt; counts port-I/O exits and bytes written to the consoles. */
static uint64_t run_to_hlt(struct vm *vm, uint64_t *console_bytes)
{
	uint64_t exits = 0;
	uint8_t lsr = 0x60; /* THRE | TEMT: the transmitter is always empty */

	for (;;) {
		if (ioctl(vm->vcpu, KVM_RUN, 0) < 0) {
			if (errno == EINTR || errno == EAGAIN)
				continue;
			die("KVM_RUN");
		}
		switch (vm->run->exit_reason) {
		case KVM_EXIT_IO: {
			uint8_t *data = (uint8_t *)vm->run + vm->run->io.data_offset;

			exits++;
			if (vm->run->io.direction == KVM_EXIT_IO_IN)
				*data = vm->run->io.port == 0x3fd ? lsr : 0xff;
			else if (console_bytes && (vm->run->io.port == 0xe9 ||
						   vm->run->io.port == 0x3f8))
				(*console_bytes)++;
			break;
		}
		case KVM_EXIT_HLT:
			return exits;
		default:
			fprintf(stderr, "raw_kvm: unexpected exit %u\n",
				vm->run->exit_reason);
			exit(1);
		}
	}
}

/* Seconds for COUNT exits of the exit-loop guest; *user gets user CPU. */
double raw_exits(const uint8_t *code, size_t len, uint64_t count, uint64_t port,
		 double *user, uint64_t *exits)
{
	uint64_t start, user_start, bytes = 0;
	struct vm vm;

	if (!kvm_fd)
		setup_system();
	create_vm(&vm, code, len);
	set_count_and_port(&vm, count, port);
	user_start = user_ns();
	start = now_ns();
	*exits = run_to_hlt(&vm, &bytes);
	start = now_ns() - start;
	*user = (user_ns() - user_start) / 1e9;
	destroy_vm(&vm);
	return start / 1e9;
}

/* Mean seconds to create a VM, memory, a vCPU and run it to hlt. */
double raw_spawn(const uint8_t *code, size_t len, uint64_t count)
{
	uint64_t total = 0, start, i;
	struct vm vm;

	if (!kvm_fd)
		setup_system();
	for (i = 0; i < count; i++) {
		start = now_ns();
		create_vm(&vm, code, len);
		run_to_hlt(&vm, NULL);
		total += now_ns() - start;
		destroy_vm(&vm); /* teardown is not part of a spawn */
	}
	return total / 1e9 / count;
}

/* A whole VM lifecycle: create, run to the first hlt, tear down. */
double raw_lifecycle(const uint8_t *code, size_t len, uint64_t count)
{
	uint64_t start, i;
	struct vm vm;

	if (!kvm_fd)
		setup_system();
	start = now_ns();
	for (i = 0; i < count; i++) {
		create_vm(&vm, code, len);
		run_to_hlt(&vm, NULL);
		destroy_vm(&vm);
	}
	return (now_ns() - start) / 1e9 / count;
}

#ifndef RAW_KVM_LIBRARY
static uint8_t *read_guest(const char *path, size_t *len)
{
	static uint8_t code[65536];
	FILE *f = fopen(path, "rb");

	if (!f)
		die(path);
	*len = fread(code, 1, sizeof(code), f);
	fclose(f);
	return code;
}

int main(int argc, char **argv)
{
	uint64_t count, start, user_start, exits = 0, bytes = 0;
	const uint8_t *code;
	struct vm vm;
	size_t len;

	if (argc < 4) {
		fprintf(stderr, "usage: raw_kvm exits|spawn|lifecycle|console GUEST COUNT [PORT]\n");
		return 2;
	}
	setup_system();
	code = read_guest(argv[2], &len);
	count = strtoull(argv[3], NULL, 0);

	if (!strcmp(argv[1], "spawn")) {
		printf("{\"seconds_per_spawn\": %.9f}\n", raw_spawn(code, len, count));
		return 0;
	}
	if (!strcmp(argv[1], "lifecycle")) {
		printf("{\"seconds_per_vm\": %.9f}\n", raw_lifecycle(code, len, count));
		return 0;
	}

	create_vm(&vm, code, len);
	set_count_and_port(&vm, count, argc > 4 ? strtoull(argv[4], NULL, 0) : 0x10);
	user_start = user_ns();
	start = now_ns();
	exits = run_to_hlt(&vm, &bytes);
	start = now_ns() - start;
	user_start = user_ns() - user_start;
	printf("{\"seconds\": %.9f, \"user_seconds\": %.9f, \"exits\": %llu, "
	       "\"console_bytes\": %llu}\n", start / 1e9, user_start / 1e9,
	       (unsigned long long)exits, (unsigned long long)bytes);
	destroy_vm(&vm);
	return 0;
}
#endif /* RAW_KVM_LIBRARY */
