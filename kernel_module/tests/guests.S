/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Guest programs for kvm_smoke and bench.  Each is copied to the guest
 * address named in its comment, so absolute addresses are computed from
 * that load address.
 */
	.section .rodata

/* Real mode, loaded at 0x1000: port I/O, CPUID, string I/O, MMIO, HLT. */
#define R(x) ((x) - real_start + 0x1000)
	.globl real_start, real_end
	.code16
real_start:
	mov	$0x3f8, %dx
	mov	$'H', %al
	out	%al, %dx
	mov	$'i', %al
	out	%al, %dx
	in	%dx, %al
	mov	%al, %bl
	inw	$0x71, %ax
	mov	%ax, %cx
	mov	$0x40000000, %eax
	cpuid
	outl	%eax, $0x10
	mov	%ebx, %eax
	outl	%eax, $0x10
	cld
	mov	$R(msg16), %si
	mov	$5, %cx
	mov	$0xe9, %dx
	rep outsb
	mov	$R(buf16), %di
	mov	$4, %cx
	rep insb
	mov	$R(buf16), %si
	mov	$2, %cx
	rep outsw
	outsb
	std
	mov	$R(msg16 + 4), %si
	mov	$3, %cx
	rep outsb
	cld
	mov	$0x9000, %ax		/* MMIO: 0x90000 is outside RAM */
	mov	%ax, %es
	movb	$0x42, %es:0x10
	movw	%es:0x20, %ax
	mov	%ax, %si
	mov	%bl, %es:0x30
	mov	%es:0x40, %dh
	hlt
msg16:	.ascii	"hello"
buf16:	.fill	8, 1, 0
real_end:

/* Real mode, loaded at 0x1000: #GP from an unknown MSR, via the IVT. */
	.globl gp_start, gp_end
gp_start:
	movw	$(gp_handler - gp_start + 0x1000), 13 * 4
	movw	$0, 13 * 4 + 2
	mov	$0x12345678, %ecx
	rdmsr
	mov	$0xee, %al
	out	%al, $0x10
	hlt
gp_handler:
	mov	$0x0d, %al
	out	%al, $0x10
	hlt
gp_end:

/* Real mode, loaded at 0x1000: read the byte at 0xc0000, report it. */
	.globl slot_start, slot_end
slot_start:
	mov	$0xc000, %ax
	mov	%ax, %ds
	mov	0, %al
	out	%al, $0x10
	hlt
slot_end:

/* Real mode, loaded at 0x1000: read, write, read back a read-only page. */
	.globl ro_start, ro_end
ro_start:
	mov	$0xe000, %ax
	mov	%ax, %ds
	mov	0, %al
	out	%al, $0x10
	movb	$0x77, 0
	mov	0, %al
	out	%al, $0x10
	hlt
ro_end:

/* Real mode, loaded at 0x1000: CX port writes to DX, then hlt. */
	.globl loop_start, loop_end
loop_start:
	out	%al, %dx
	loop	loop_start
	hlt
loop_end:

/* Real mode, loaded at 0x1000: triple fault through an empty IVT. */
	.globl triple_start, triple_end
triple_start:
	lidt	%cs:(triple_idt - triple_start + 0x1000)
	int3
	hlt
triple_idt:
	.word	0
	.long	0
triple_end:

/* Real mode, loaded at 0x1000: spin, for the signal test. */
	.globl spin_start, spin_end
spin_start:
	jmp	spin_start
spin_end:

/* Real mode, loaded at 0x1000: the benchmark loop. */
	.globl bench_start, bench_end
bench_start:
	out	%al, $0x10
	jmp	bench_start
bench_end:

/* Real mode, loaded at 0x1000: the word at 0x800 to port 0x10, then hlt. */
	.globl many_start, many_end
many_start:
	mov	0x800, %ax
	out	%ax, $0x10
	hlt
many_end:

/* 32-bit protected mode, flat, loaded at 0x2000: MMIO forms. */
#define P(x) ((x) - pm_start + 0x2000)
	.globl pm_start, pm_end
	.code32
pm_start:
	mov	$0xd0000000, %edi
	mov	$0xdeadbeef, %eax
	mov	%eax, (%edi)
	mov	4(%edi), %ebx
	movb	$0x5a, 8(%edi)
	movzwl	0xc(%edi), %ecx
	movsbl	0x10(%edi), %edx
	mov	%bh, 0x11(%edi)
	movw	$0x1234, 0x12(%edi)
	mov	0xd0000020, %eax
	mov	%eax, %esi
	mov	%ebx, %eax
	out	%eax, $0x10
	mov	%ecx, %eax
	out	%eax, $0x10
	mov	%edx, %eax
	out	%eax, $0x10
	mov	%esi, %eax
	out	%eax, $0x10
	mov	$P(msg32), %esi
	mov	$3, %ecx
	mov	$0xe9, %dx
	rep outsb
	mov	$0xc0000080, %ecx
	rdmsr
	out	%eax, $0x10
	hlt
msg32:	.ascii	"abc"
pm_end:

/* 64-bit long mode, identity-mapped, loaded at 0x3000. */
	.globl lm_start, lm_end
	.code64
lm_start:
	mov	$0xd0000000, %rdi
	mov	$0x1122334455667788, %rax
	mov	%rax, (%rdi)
	mov	8(%rdi), %rbx
	movb	$0x7f, 0x10(%rdi)
	movsbq	0x11(%rdi), %rcx
	movl	$0x89abcdef, 0x18(%rdi)
	movq	$-2, 0x20(%rdi)
	mov	0x28(%rdi), %r9d
	mov	%r9w, 0x30(%rdi)
	mov	%rbx, %rax
	out	%eax, $0x10
	shr	$32, %rax
	out	%eax, $0x10
	mov	%rcx, %rax
	out	%eax, $0x10
	mov	%r9, %rax
	out	%eax, $0x10
	lea	msg64(%rip), %rsi
	mov	$4, %ecx
	mov	$0xe9, %dx
	rep outsb
	lea	buf64(%rip), %rdi
	mov	$3, %ecx
	rep insb
	lea	buf64(%rip), %rsi
	mov	$3, %ecx
	rep outsb
	mov	$0x40000000, %eax
	cpuid
	out	%eax, $0x10
	mov	$0xc0000080, %ecx
	rdmsr
	out	%eax, $0x10
	hlt
msg64:	.ascii	"long"
buf64:	.fill	4, 1, 0
lm_end:

/* 64-bit, loaded at 0x3000: XMM state must survive exits to user space. */
	.globl fpu_start, fpu_end
fpu_start:
	mov	$0x0123456789abcdef, %rax
	movq	%rax, %xmm0
	mov	$0x55aa, %eax
	movd	%eax, %xmm7
	out	%eax, $0x10
	out	%eax, $0x10
	movq	%xmm0, %rax
	out	%eax, $0x10
	shr	$32, %rax
	out	%eax, $0x10
	movd	%xmm7, %eax
	out	%eax, $0x10
	hlt
fpu_end:

/* 64-bit, loaded at 0x3100: report XMM0 as set through KVM_SET_FPU. */
	.globl xmm_out_start, xmm_out_end
xmm_out_start:
	movq	%xmm0, %rax
	out	%eax, $0x10
	shr	$32, %rax
	out	%eax, $0x10
	hlt
xmm_out_end:

/* 32-bit, loaded at 0x2000: an ALU op on MMIO, beyond the MOV decoder. */
	.globl alu_start, alu_end
	.code32
alu_start:
	mov	$0xd0000000, %edi
	add	%eax, (%edi)
	hlt
alu_end:
	.section .note.GNU-stack, "", @progbits
