# Long mode, one copy per vCPU: each vCPU gets its index in %rdi, counts to
# %rsi, and stores index * 1000 + 7 at 0x5000 + 8 * index, then halts.
	.code64
	.globl _start
_start:
	xor	%rcx, %rcx
loop:
	inc	%rcx
	cmp	%rsi, %rcx
	jb	loop
	mov	%rdi, %rax
	imul	$1000, %rax
	add	$7, %rax
	mov	%rax, 0x5000(,%rdi,8)
	hlt
