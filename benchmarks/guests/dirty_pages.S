# Long mode: write one byte into each of %rcx pages from 1 MiB up, then hlt
# (the snapshot-restore benchmark: "the guest dirtied N pages").
	.code64
	.globl _start
_start:
	mov	$0x100000, %rdi
next:
	movb	$1, (%rdi)
	add	$4096, %rdi
	dec	%rcx
	jnz	next
	hlt
