# A guest "function": reads n from 0x6000, computes n * n + 7 (by repeated
# addition, so that it does some work), stores it at 0x6008, and halts.
	.code64
	.globl _start
_start:
	mov	0x6000, %rcx
	xor	%rax, %rax
	mov	%rcx, %rdx
square:
	test	%rdx, %rdx
	jz	done
	add	%rcx, %rax
	dec	%rdx
	jmp	square
done:
	add	$7, %rax
	mov	%rax, 0x6008
	hlt
