# Compute-bound: %rcx rounds of xorshift64 on %rax, then hlt.
	.code64
	.globl _start
_start:
	mov	$88172645463325252, %rax
round:
	mov	%rax, %rdx
	shl	$13, %rdx
	xor	%rdx, %rax
	mov	%rax, %rdx
	shr	$7, %rdx
	xor	%rdx, %rax
	mov	%rax, %rdx
	shl	$17, %rdx
	xor	%rdx, %rax
	dec	%rcx
	jnz	round
	hlt
