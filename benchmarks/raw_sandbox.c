// SPDX-License-Identifier: MIT
/*
 * The raw-C baseline of benchmarks/sandbox.py: guest function calls with
 * bare KVM ioctls, on a VM and vCPU that pyvt set up (ring-3 long mode, the
 * guest loaded, its snapshot taken; none of that is timed).  Each call does
 * only what a call needs: copy the argument into the arena, set the
 * registers (through kvm_run's synced registers, as pyvt does), KVM_RUN
 * until the return trampoline's write to the debug-exit port, read rax, then
 * KVM_GET_DIRTY_LOG and copy back the pages the call dirtied.
 *
 * Built as a shared object and called through cffi, in pyvt's own process.
 */
#include <errno.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>

#define PAGE_SIZE 4096

struct raw_call {
	int vm_fd, vcpu_fd;
	struct kvm_run *run;
	uint8_t *memory;		/* guest RAM at guest-physical 0 */
	const uint8_t *pristine;	/* its contents at the snapshot */
	uint64_t memory_size;
	uint32_t slot;
	uint16_t exit_port;		/* the trampoline writes here */
	uint64_t rip, rsp, rflags;	/* the function, its entry stack */
	uint64_t args[6];
	int nargs;
	const uint8_t *arg_data;	/* copied to arg_address each call */
	uint64_t arg_len, arg_address;
};

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static int restore_dirty_pages(const struct raw_call *c, uint64_t *bitmap)
{
	struct kvm_dirty_log log = { .slot = c->slot, .dirty_bitmap = bitmap };
	uint64_t words = c->memory_size / PAGE_SIZE / 64, i;

	if (ioctl(c->vm_fd, KVM_GET_DIRTY_LOG, &log) < 0)
		return -errno;
	for (i = 0; i < words; i++) {
		uint64_t bits = bitmap[i];

		while (bits) {
			uint64_t page = i * 64 + __builtin_ctzll(bits);

			memcpy(c->memory + page * PAGE_SIZE, c->pristine + page * PAGE_SIZE,
			       PAGE_SIZE);
			bits &= bits - 1;
		}
	}
	return 0;
}

/*
 * Makes `calls` calls; returns the seconds they took (or -errno, or -1e9
 * for an exit other than the trampoline's), the last rax in *result.
 */
double raw_sandbox_calls(const struct raw_call *c, uint64_t calls, uint64_t *result)
{
	uint64_t *bitmap = calloc(c->memory_size / PAGE_SIZE / 64 + 1, sizeof(uint64_t));
	struct kvm_regs *regs = &c->run->s.regs.regs;
	__u64 *arg_registers[6] = { &regs->rdi, &regs->rsi, &regs->rdx,
				    &regs->rcx, &regs->r8, &regs->r9 };
	uint64_t start, i;
	int rc, a;

	if (!bitmap)
		return -ENOMEM;
	rc = restore_dirty_pages(c, bitmap); /* start from a clean log */
	if (rc)
		goto out;
	start = now_ns();
	for (i = 0; i < calls; i++) {
		memcpy(c->memory + c->arg_address, c->arg_data, c->arg_len);
		regs->rip = c->rip;
		regs->rsp = c->rsp;
		regs->rflags = c->rflags;
		for (a = 0; a < c->nargs; a++)
			*arg_registers[a] = c->args[a];
		c->run->kvm_dirty_regs = KVM_SYNC_X86_REGS;
		for (;;) {
			if (ioctl(c->vcpu_fd, KVM_RUN, 0) < 0) {
				if (errno == EINTR || errno == EAGAIN)
					continue;
				rc = -errno;
				goto out;
			}
			if (c->run->exit_reason == KVM_EXIT_IO &&
			    c->run->io.port == c->exit_port)
				break;
			free(bitmap);
			return -1e9;
		}
		*result = regs->rax;
		rc = restore_dirty_pages(c, bitmap);
		if (rc)
			goto out;
	}
	free(bitmap);
	return (now_ns() - start) / 1e9;
out:
	free(bitmap);
	return rc;
}
