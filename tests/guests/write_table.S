# Writes rbx to each address of the zero-terminated table of qwords at rsi,
# then halts.  No stack, no calls: the only pages it writes are the table's
# addresses (what the dirty-page tests and benchmarks/dirty_log.py count).
	.code64
	.globl _start
_start:
	mov	(%rsi), %rdi
	test	%rdi, %rdi
	jz	done
	mov	%rbx, (%rdi)
	add	$8, %rsi
	jmp	_start
done:
	hlt
