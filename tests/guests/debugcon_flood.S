# Long mode: write %rcx bytes to the debug console at 0xe9 (cycling through
# the alphabet), then write a newline through the UART and halt.  Used by the
# ordering test and the benchmarks.
	.code64
	.globl _start
_start:
	xor	%rbx, %rbx
next:
	test	%rcx, %rcx
	jz	done
	mov	%bl, %al
	add	$'a', %al
	out	%al, $0xe9
	inc	%bl
	cmp	$26, %bl
	jb	same
	xor	%bl, %bl
same:
	dec	%rcx
	jmp	next
done:
	mov	$'\n', %al
	mov	$0x3f8, %dx
	out	%al, %dx
	hlt
